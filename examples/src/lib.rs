//! Runnable assemblies of kole (see the `examples` of this package), and the command-line argument
//! groups they share, parsed with clap: [`BrokerArgs`] (which brokers, which fleet, the password) and
//! [`ControllerLoginArgs`] (the controller's MQTT user name).
//!
//! An example flattens them into its own parser, so every program spells a flag, its environment
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
//! let cli = Cli::try_parse_from(["prog", "--broker", "mqtt://10.0.0.1:1883,mqtt://10.0.0.2:1883"])?;
//! assert_eq!(cli.mqtt.brokers().len(), 2);
//! # Ok::<(), clap::Error>(())
//! ```

use kole_mqtt::BrokerAddr;

/// Which MQTT brokers, which fleet, and the password: the flags every MQTT program of a fleet shares.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "MQTT")]
pub struct BrokerArgs {
    /// MQTT broker (`mqtt://HOST:PORT`); repeat the flag or give a comma-separated list. Nodes are
    /// spread over a set by a stable hash of their name, so every program of a fleet lists the same
    /// brokers in the same order.
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
    /// Password for the broker (an agent's own; the controller's with `--mqtt-user`).
    // The value never shows in `--help`: it is a secret.
    #[arg(long, visible_alias = "password", value_name = "P", env = "KOLE_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
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
}

/// The controller's MQTT user name (an agent logs in as its node name instead).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "MQTT")]
pub struct ControllerLoginArgs {
    /// The controller's MQTT user name.
    #[arg(long, visible_alias = "user", value_name = "USER", env = "KOLE_MQTT_USER")]
    pub mqtt_user: Option<String>,
}

/// One entry of a broker list. An empty one (`a,,b`, or `KOLE_MQTT_BROKERS=""` in a manifest) is
/// no broker rather than an error, as the controller example has always read it.
#[derive(Debug, Clone)]
struct BrokerEntry(Option<BrokerAddr>);

/// Parses a [`BrokerEntry`]; spaces around it are ignored, so `a, b` lists two brokers.
fn broker_entry(s: &str) -> Result<BrokerEntry, kole_mqtt::Error> {
    let s = s.trim();
    Ok(BrokerEntry(if s.is_empty() { None } else { Some(s.parse()?) }))
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
    }

    #[test]
    fn defaults_and_aliases() {
        let cli = parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.mqtt.fleet, "default");
        let fallback = BrokerAddr::tcp("127.0.0.1", 1883);
        assert_eq!(cli.mqtt.brokers_or(fallback.clone()), [fallback]);
        let cli = parse("--fleet prod --user ctl --password pw").unwrap();
        assert_eq!(
            (cli.mqtt.fleet.as_str(), cli.login.mqtt_user.as_deref(), cli.mqtt.mqtt_password.as_deref()),
            ("prod", Some("ctl"), Some("pw"))
        );
    }

    #[test]
    fn refuses_unknown_flags_missing_values_and_bad_brokers() {
        use clap::error::ErrorKind;
        assert_eq!(parse("--typo 1").unwrap_err().kind(), ErrorKind::UnknownArgument);
        assert!(parse("--fleet").is_err());
        assert!(parse("--broker").is_err());
        assert!(parse("--broker ftp://a:1").is_err());
        assert!(parse("stray").is_err());
    }
}
