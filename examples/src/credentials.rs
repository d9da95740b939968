//! MQTT credentials for a fleet: a random password per node and for the controller, a Mosquitto
//! password file in its hashed format, and one password file per agent.
//!
//! Used by `kole-controller credentials`; the layout it writes is documented in `docs/agent.md`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use kole_core::model::NodeName;

/// PBKDF2 iterations of a `$7$` hash: `mosquitto_passwd`'s default.
pub const MOSQUITTO_ITERATIONS: u32 = 101;
/// Salt bytes of a `$7$` hash, as `mosquitto_passwd` writes them.
const SALT_BYTES: usize = 12;
/// Random bytes of a generated password (192 bits, 32 characters of URL-safe base64).
const PASSWORD_BYTES: usize = 24;

/// A line of a Mosquitto password file for `user` (`user:$7$101$salt$hash`): PBKDF2-HMAC-SHA512
/// over `password` with `salt`, as Mosquitto 2 hashes and checks it.
pub fn mosquitto_line(user: &str, password: &str, salt: &[u8], iterations: u32) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, iterations, &mut hash);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("{user}:$7${iterations}${}${}", b64.encode(salt), b64.encode(hash))
}

/// A new Ed25519 signing key for the downlink, from the OS's random source.
pub fn new_signing_key() -> anyhow::Result<kole_core::protocol::seal::DownlinkSigner> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("reading random bytes from the OS: {e}"))?;
    Ok(kole_core::protocol::seal::DownlinkSigner::from_seed(seed))
}

/// Writes the downlink key pair into `dir` unless `signing.key` is there already (then it is read
/// and kept): `signing.key` (the secret, 0600, for `kole-controller --signing-key`) and
/// `trusted-keys` (the public key, for every agent's `--trusted-keys`). Returns the signer and
/// whether it was kept.
pub fn write_signing_key(dir: &Path) -> anyhow::Result<(kole_core::protocol::seal::DownlinkSigner, bool)> {
    let secret = dir.join("signing.key");
    let (signer, kept) = match fs::read_to_string(&secret) {
        Ok(text) => (
            kole_core::protocol::seal::DownlinkSigner::from_text(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", secret.display()))?,
            true,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = new_signing_key()?;
            write_private(&secret, s.to_text().as_bytes())?;
            (s, false)
        }
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", secret.display())),
    };
    let public = format!(
        "# Downlink keys agents trust (kole-agent --trusted-keys). Add the next key before rotating;
         # `revoked:<key id>` refuses a key even if listed.
{}
",
        signer.public_text()
    );
    write_private(&dir.join("trusted-keys"), public.as_bytes())?;
    Ok((signer, kept))
}

/// A new random password (URL-safe base64, no padding: safe in files, YAML and shell variables).
pub fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("reading random bytes from the OS: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn random_salt() -> anyhow::Result<[u8; SALT_BYTES]> {
    let mut salt = [0u8; SALT_BYTES];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("reading random bytes from the OS: {e}"))?;
    Ok(salt)
}

/// Reads a nodes file: one node name per line; blank lines and `#` comments are skipped; each name
/// must be a valid node name, and a name may appear only once.
pub fn read_nodes_file(path: &Path) -> anyhow::Result<Vec<NodeName>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading the nodes file {}", path.display()))?;
    let mut nodes = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let name = NodeName::new(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {line:?} is not a node name: {e}", path.display(), i + 1))?;
        anyhow::ensure!(seen.insert(line.to_owned()), "{}:{}: node {line} is listed twice", path.display(), i + 1);
        nodes.push(name);
    }
    anyhow::ensure!(!nodes.is_empty(), "the nodes file {} lists no node", path.display());
    Ok(nodes)
}

/// What [`write_fleet_credentials`] wrote.
#[derive(Debug)]
pub struct FleetCredentials {
    /// The Mosquitto password file of the nodes' listener (every node, no controller).
    pub nodes_passwd: PathBuf,
    /// The Mosquitto password file of the controller's listener (the controller only).
    pub controller_passwd: PathBuf,
    /// The controller's password file.
    pub controller: PathBuf,
    /// Each node's password file.
    pub nodes: Vec<PathBuf>,
    /// Nodes that already had a password file under `out` and kept their password.
    pub kept: usize,
}

/// Writes the credentials of `nodes` and `controller_user` under `out` (created 0700):
///
/// - `out/nodes/{node}.password`: the node's password (0600), for its agent's `--password-file`;
/// - `out/{controller_user}.password`: the controller's (0600);
/// - `out/nodes.passwd`: every node's `$7$` hash (0600), the `password_file` of the brokers'
///   nodes' listener (`deploy/mqtt/mosquitto.conf`, where a node's client id is its user name);
/// - `out/controller.passwd`: the controller's hash (0600), the `password_file` of the
///   controller's listener. Two files, so that no node can log in where the controller's
///   connections choose their own client ids, and the controller cannot log in as a node.
///
/// A password file that exists already is kept (re-running with more nodes adds them without
/// changing anyone's password); the hash files are rewritten from all of them.
pub fn write_fleet_credentials(
    out: &Path,
    controller_user: &str,
    nodes: &[NodeName],
) -> anyhow::Result<FleetCredentials> {
    NodeName::new(controller_user)
        .map_err(|e| anyhow::anyhow!("controller user {controller_user:?} is not a valid MQTT user name: {e}"))?;
    anyhow::ensure!(
        nodes.iter().all(|n| n.as_str() != controller_user),
        "a node is named like the controller user {controller_user}: the broker could not tell them apart"
    );
    // A node's client id is its name; the controller's are `{controller_user}-{random tag}-…`.
    let prefix = format!("{controller_user}-");
    if let Some(n) = nodes.iter().find(|n| n.as_str().starts_with(&prefix)) {
        anyhow::bail!(
            "node {n} starts with {prefix:?}, the prefix of the controller's MQTT client ids: rename the node \
             (or choose another --controller-user)"
        );
    }
    private_dir(out)?;
    private_dir(&out.join("nodes"))?;
    let mut users = BTreeMap::new();
    let mut kept = 0;
    let controller = out.join(format!("{controller_user}.password"));
    let (controller_pw, _) = password_at(&controller)?;
    let mut node_files = Vec::with_capacity(nodes.len());
    for n in nodes {
        let path = out.join("nodes").join(format!("{n}.password"));
        let (pw, existed) = password_at(&path)?;
        kept += usize::from(existed);
        users.insert(n.to_string(), pw);
        node_files.push(path);
    }
    let mut passwd = String::new();
    for (user, pw) in &users {
        passwd.push_str(&mosquitto_line(user, pw, &random_salt()?, MOSQUITTO_ITERATIONS));
        passwd.push('\n');
    }
    let nodes_passwd = out.join("nodes.passwd");
    write_private(&nodes_passwd, passwd.as_bytes())?;
    let controller_passwd = out.join("controller.passwd");
    let line = mosquitto_line(controller_user, &controller_pw, &random_salt()?, MOSQUITTO_ITERATIONS);
    write_private(&controller_passwd, format!("{line}\n").as_bytes())?;
    // The single file earlier versions wrote held every user: a broker still pointed at it would
    // let the controller's password in on the nodes' listener. Remove it so that shows.
    match fs::remove_file(out.join("mosquitto.passwd")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}/mosquitto.passwd", out.display())),
    }
    Ok(FleetCredentials { nodes_passwd, controller_passwd, controller, nodes: node_files, kept })
}

/// The password in `path`, or a new one written there (0600). The flag says whether it existed.
fn password_at(path: &Path) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        return crate::read_password_file(path).map(|p| (p, true));
    }
    let pw = random_password()?;
    write_private(path, format!("{pw}\n").as_bytes())?;
    Ok((pw, false))
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))
}

/// Writes `bytes` to `path` with mode 0600 (through a temporary file and a rename, so a reader
/// never sees half a file).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // The mode applies only to a new file; a stale temp file may have another.
    f.set_permissions(fs::Permissions::from_mode(0o600)).with_context(|| format!("chmod 0600 {}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A line written by Debian's `mosquitto_passwd` 2.0.11 (`mosquitto_passwd -b f edge-1 secret`),
    /// whose salt is reused here: the same password must give the same hash.
    #[test]
    fn matches_mosquitto_passwd() {
        let line = "edge-1:$7$101$OGSxHwK/poN/41k6$Feb0gTAPkrzX6dF0EB8knV7wejAljyWZzup94fEtO1+QDUQwGuUZD8umj0eLSnQmnLZ/DVUkKCoJyV7rv42lqQ==";
        let salt = base64::engine::general_purpose::STANDARD.decode("OGSxHwK/poN/41k6").unwrap();
        assert_eq!(mosquitto_line("edge-1", "secret", &salt, 101), line);
    }

    #[test]
    fn random_passwords_differ_and_are_plain_text() {
        let (a, b) = (random_password().unwrap(), random_password().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'), "{a}");
    }

    #[test]
    fn nodes_file_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("kole-nodes-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("nodes");
        fs::write(&f, "# fleet\nedge-1\n\nedge-2  # lab\n").unwrap();
        let names: Vec<String> = read_nodes_file(&f).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(names, ["edge-1", "edge-2"]);
        fs::write(&f, "edge-1\nedge/2\n").unwrap();
        let err = read_nodes_file(&f).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("edge/2"), "{err}");
        fs::write(&f, "edge-1\nedge-1\n").unwrap();
        assert!(read_nodes_file(&f).unwrap_err().to_string().contains("twice"));
        fs::write(&f, "# nobody\n").unwrap();
        assert!(read_nodes_file(&f).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_private_files_and_keeps_existing_passwords() {
        let out = std::env::temp_dir().join(format!("kole-creds-{}", std::process::id()));
        let _ = fs::remove_dir_all(&out);
        let nodes = |names: &[&str]| names.iter().map(|n| NodeName::new(*n).unwrap()).collect::<Vec<_>>();
        let first = write_fleet_credentials(&out, "kole-controller", &nodes(&["edge-1", "edge-2"])).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&first.nodes_passwd), 0o600);
        assert_eq!(mode(&first.controller_passwd), 0o600);
        assert_eq!(mode(&first.controller), 0o600);
        assert!(first.nodes.iter().all(|n| mode(n) == 0o600));
        let edge1 = fs::read_to_string(&first.nodes[0]).unwrap();
        let users = |p: &Path| -> Vec<String> {
            let text = fs::read_to_string(p).unwrap();
            assert!(text.lines().all(|l| l.contains(":$7$101$")), "{text}");
            text.lines().map(|l| l.split(':').next().unwrap().to_owned()).collect()
        };
        assert_eq!(users(&first.nodes_passwd), ["edge-1", "edge-2"]);
        assert_eq!(users(&first.controller_passwd), ["kole-controller"]);

        // An old single password file (every user) is removed, not left for a broker to load.
        fs::write(out.join("mosquitto.passwd"), "old").unwrap();
        let second = write_fleet_credentials(&out, "kole-controller", &nodes(&["edge-1", "edge-2", "edge-3"])).unwrap();
        assert_eq!(second.kept, 2, "edge-1 and edge-2 keep their passwords");
        assert_eq!(fs::read_to_string(&second.nodes[0]).unwrap(), edge1);
        assert_eq!(users(&second.nodes_passwd), ["edge-1", "edge-2", "edge-3"]);
        assert!(!out.join("mosquitto.passwd").exists());
        assert!(write_fleet_credentials(&out, "edge-1", &nodes(&["edge-1"])).is_err());
        // A node whose name (its client id) starts like the controller's client ids.
        let e = write_fleet_credentials(&out, "kole-controller", &nodes(&["kole-controller-1a2b-0-0"])).unwrap_err();
        assert!(e.to_string().contains("prefix of the controller's MQTT client ids"), "{e}");
        fs::remove_dir_all(&out).unwrap();
    }

    proptest! {
        /// Every line has the `$7$` shape Mosquitto parses: user, iterations, 16-character salt,
        /// 88-character hash.
        #[test]
        fn lines_have_the_mosquitto_shape(pw in "[ -~]{0,40}", salt in proptest::array::uniform12(any::<u8>())) {
            let line = mosquitto_line("n", &pw, &salt, 101);
            let parts: Vec<&str> = line.split('$').collect();
            prop_assert_eq!(parts.len(), 5);
            prop_assert_eq!(parts[0], "n:");
            prop_assert_eq!((parts[1], parts[2]), ("7", "101"));
            prop_assert_eq!((parts[3].len(), parts[4].len()), (16, 88));
        }
    }
}
