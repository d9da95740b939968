//! kole's programs, `kole-controller` and `kole-agent` (`cargo install --path examples`), the
//! smaller runnable assemblies (the `examples` of this package), and the command-line argument
//! groups they share, parsed with clap:
//!
//! - [`BrokerArgs`]: which brokers, which fleet, the password (from a file or the environment);
//! - [`TlsArgs`]: the CA and client certificate for `mqtts://` brokers;
//! - [`LogArgs`]: text or JSON logs, and their level;
//! - [`ControllerLoginArgs`]: the controller's MQTT user name.
//!
//! A program flattens them into its own parser, so every program spells a flag, its environment
//! variable and its default the same way:
//!
//! ```
//! use clap::Parser;
//! use kole_examples::BrokerArgs;
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     mqtt: BrokerArgs,
//! }
//!
//! let cli = Cli::try_parse_from(["prog", "--broker", "mqtts://10.0.0.1:8883,mqtts://10.0.0.2:8883"])?;
//! assert_eq!(cli.mqtt.brokers().len(), 2);
//! # Ok::<(), clap::Error>(())
//! ```

pub mod credentials;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use kole_mqtt::{BrokerAddr, TlsSettings};

/// The environment variable holding the MQTT password when no password file is given.
pub const PASSWORD_ENV: &str = "KOLE_MQTT_PASSWORD";

/// Which MQTT brokers, which fleet, and the password: the flags every MQTT program of a fleet shares.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "MQTT")]
pub struct BrokerArgs {
    /// MQTT broker (`mqtts://HOST:PORT`, or `mqtt://HOST:PORT` for plain TCP); repeat the flag or
    /// give a comma-separated list. Nodes are spread over a set by a stable hash of their name, so
    /// every program of a fleet lists the same brokers in the same order.
    #[arg(
        long = "broker",
        value_name = "URL",
        env = "KOLE_MQTT_BROKERS",
        value_delimiter = ',',
        value_parser = broker_entry
    )]
    brokers: Vec<BrokerEntry>,
    /// Fleet name in the topic layout.
    #[arg(long, value_name = "NAME", env = "KOLE_FLEET", default_value = "default")]
    pub fleet: String,
    /// File holding the MQTT password (its first line); without it, the password is read from the
    /// environment variable KOLE_MQTT_PASSWORD, if set. Never on the command line: it would show in
    /// `ps`.
    #[arg(long, visible_alias = "password-file", value_name = "FILE", env = "KOLE_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// The brokers given, in order (none: the program's own default applies).
    pub fn brokers(&self) -> Vec<BrokerAddr> {
        self.brokers.iter().filter_map(|b| b.0.clone()).collect()
    }

    /// The brokers given, or `fallback` alone when none was.
    pub fn brokers_or(&self, fallback: BrokerAddr) -> Vec<BrokerAddr> {
        let brokers = self.brokers();
        if brokers.is_empty() { vec![fallback] } else { brokers }
    }

    /// The password: the first line of `--mqtt-password-file`, else `$KOLE_MQTT_PASSWORD`, else none.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        match &self.mqtt_password_file {
            Some(path) => read_password_file(path).map(Some),
            None => Ok(std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty())),
        }
    }
}

/// Reads a password file: its first line, without the line ending. An empty file is an error (a
/// broker would refuse the login, later and less clearly).
pub fn read_password_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the MQTT password file {} (check --mqtt-password-file)", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    anyhow::ensure!(!line.is_empty(), "the MQTT password file {} is empty", path.display());
    Ok(line.to_owned())
}

/// The controller's MQTT user name (an agent logs in as its node name instead).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "MQTT")]
pub struct ControllerLoginArgs {
    /// The controller's MQTT user name.
    #[arg(long, visible_alias = "user", value_name = "USER", env = "KOLE_MQTT_USER")]
    pub mqtt_user: Option<String>,
}

/// TLS to `mqtts://` brokers: which CA to trust, and a client certificate when the broker asks for one.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// PEM file of the CA(s) that signed the brokers' certificates [default: the system's CA store].
    #[arg(long, value_name = "FILE", env = "KOLE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of a client certificate (chain), for brokers that require one; needs `--tls-key`.
    #[arg(long, value_name = "FILE", env = "KOLE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, value_name = "FILE", env = "KOLE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings for `brokers`: `None` when none of them is `mqtts://`. Logs a warning for
    /// each plain `mqtt://` broker (passwords and specs cross the network in clear).
    pub fn settings(&self, brokers: &[BrokerAddr]) -> anyhow::Result<Option<TlsSettings>> {
        for b in brokers.iter().filter(|b| !b.tls) {
            tracing::warn!(broker = %b, "plain MQTT without TLS: the password and every message cross the network in clear; use mqtts://");
        }
        if !brokers.iter().any(|b| b.tls) {
            return Ok(None);
        }
        self.client_config().map(|c| Some(TlsSettings { client_config: Arc::new(c) }))
    }

    fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        match &self.tls_ca {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("reading the CA file {} (--tls-ca)", path.display()))?;
                anyhow::ensure!(!certs.is_empty(), "the CA file {} holds no certificate (--tls-ca)", path.display());
                for c in certs {
                    roots.add(c).with_context(|| format!("a certificate in {} is not a valid CA", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!(error = %e, "reading the system's CA store");
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                anyhow::ensure!(added > 0, "the system's CA store is empty: give the brokers' CA with --tls-ca");
            }
        }
        // This program's provider, not a process-wide default: the library picks none.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
        Ok(match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("reading the client certificate {} (--tls-cert)", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("reading the client key {} (--tls-key)", key.display()))?;
                builder.with_client_auth_cert(chain, key).context("the client certificate and key do not match")?
            }
            _ => builder.with_no_client_auth(),
        })
    }
}

/// How a program writes its logs (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags: format and level.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log format.
    #[arg(long, value_name = "FORMAT", env = "KOLE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `kole_kube=debug,info`, …) [default: $RUST_LOG, else `info`].
    #[arg(long, value_name = "FILTER", env = "KOLE_LOG_LEVEL")]
    pub log_level: Option<String>,
}

impl LogArgs {
    /// Installs the process's log subscriber (stderr). Libraries (kole-kube, kube, rumqttc) log
    /// through `tracing` and show up here.
    pub fn init(&self) -> anyhow::Result<()> {
        use tracing_subscriber::EnvFilter;
        let filter = match &self.log_level {
            Some(f) => EnvFilter::try_new(f).with_context(|| format!("--log-level {f:?} is not a level or filter"))?,
            None => match std::env::var("RUST_LOG") {
                Ok(f) if !f.is_empty() => {
                    EnvFilter::try_new(&f).with_context(|| format!("RUST_LOG={f:?} is not a level or filter"))?
                }
                _ => EnvFilter::new("info"),
            },
        };
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
        let installed = match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        };
        installed.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C); returns the signal's name.
pub async fn termination_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// One entry of a broker list. An empty one (`a,,b`, or `KOLE_MQTT_BROKERS=""` in a manifest) is
/// no broker rather than an error, as the controller has always read it.
#[derive(Debug, Clone)]
struct BrokerEntry(Option<BrokerAddr>);

/// Parses a [`BrokerEntry`]; spaces around it are ignored, so `a, b` lists two brokers.
fn broker_entry(s: &str) -> Result<BrokerEntry, kole_mqtt::Error> {
    let s = s.trim();
    Ok(BrokerEntry(if s.is_empty() { None } else { Some(s.parse()?) }))
}

/// This machine's CPU architecture in Go's `GOARCH` spelling, as Kubernetes and kole's
/// `NodeInfo::arch` use it (`amd64`, `arm64`), not Rust's (`x86_64`, `aarch64`).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A program that takes the shared groups and one switch.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        mqtt: BrokerArgs,
        #[command(flatten)]
        login: ControllerLoginArgs,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        log: LogArgs,
        #[arg(long)]
        dry_run: bool,
    }

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("prog").chain(line.split_whitespace()))
    }

    fn brokers(cli: &Cli) -> Vec<String> {
        cli.mqtt.brokers().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_groups_are_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn brokers_repeat_or_come_as_a_list() {
        let repeated = parse("--broker a:1 --broker=b:2 --dry-run").unwrap();
        let listed = parse("--broker a:1,b:2").unwrap();
        assert_eq!(brokers(&repeated).len(), 2);
        assert_eq!(brokers(&repeated), brokers(&listed));
        assert!(repeated.dry_run);
        assert_eq!(parse("--broker a:1,b:2 --broker c:3").unwrap().mqtt.brokers().len(), 3);
        assert_eq!(brokers(&parse("--broker a:1,,b:2,").unwrap()), brokers(&listed), "empty entries are skipped");
        assert!(parse("--broker=").unwrap().mqtt.brokers().is_empty());
        assert!(parse("--broker mqtts://a").unwrap().mqtt.brokers()[0].tls);
    }

    #[test]
    fn defaults_and_aliases() {
        let cli = parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.mqtt.fleet, "default");
        assert_eq!(cli.log.log_format, LogFormat::Text);
        let fallback = BrokerAddr::tcp("127.0.0.1", 1883);
        assert_eq!(cli.mqtt.brokers_or(fallback.clone()), [fallback]);
        let cli = parse("--fleet prod --user ctl --password-file /run/pw --log-format json").unwrap();
        assert_eq!(
            (cli.mqtt.fleet.as_str(), cli.login.mqtt_user.as_deref(), cli.mqtt.mqtt_password_file.as_deref()),
            ("prod", Some("ctl"), Some(Path::new("/run/pw")))
        );
        assert_eq!(cli.log.log_format, LogFormat::Json);
    }

    #[test]
    fn refuses_unknown_flags_missing_values_and_bad_brokers() {
        use clap::error::ErrorKind;
        assert_eq!(parse("--typo 1").unwrap_err().kind(), ErrorKind::UnknownArgument);
        assert!(parse("--fleet").is_err());
        assert!(parse("--broker").is_err());
        assert!(parse("--broker ftp://a:1").is_err());
        assert!(parse("stray").is_err());
        assert!(parse("--password pw").is_err(), "no password on the command line");
        assert!(parse("--tls-cert c.pem").is_err(), "a client certificate needs its key");
        assert!(parse("--log-format xml").is_err());
    }

    #[test]
    fn the_password_comes_from_the_file_first_line() {
        let dir = std::env::temp_dir().join(format!("kole-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let cli = parse(&format!("--password-file {}", file.display())).unwrap();
        assert_eq!(cli.mqtt.password().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        let err = cli.mqtt.password().unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let missing = parse("--password-file /nonexistent/kole/pw").unwrap();
        let err = format!("{:#}", missing.mqtt.password().unwrap_err());
        assert!(err.contains("/nonexistent/kole/pw") && err.contains("--mqtt-password-file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_settings_only_for_mqtts_and_a_bad_ca_is_a_clear_error() {
        let _ = rustls::crypto::ring::default_provider();
        let plain = parse("").unwrap();
        assert!(plain.tls.settings(&[BrokerAddr::tcp("h", 1883)]).unwrap().is_none());
        let bad = parse("--tls-ca /nonexistent/ca.pem").unwrap();
        let tls: BrokerAddr = "mqtts://h:8883".parse().unwrap();
        let err = format!("{:#}", bad.tls.settings(&[tls]).unwrap_err());
        assert!(err.contains("/nonexistent/ca.pem") && err.contains("--tls-ca"), "{err}");
    }
}
