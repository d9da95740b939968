//! The runtime spec: what a node runs for a workload, in the one format every part kole ships
//! agrees on (kole-kube's converter writes it, the process and container runtimes read it).
//!
//! The wire keeps a workload's spec as opaque bytes ([`crate::model::Workload::spec`]), so an
//! integrator may carry a format of their own to a runtime of their own. kole's runtimes expect a
//! [`RunSpec`], and anything else is a clear [`RunSpecError`] (reported as the workload's failure
//! reason), never a silent `Failed`.
//!
//! # Encoding (format version 1)
//!
//! ```text
//! "KRS"          3 bytes, the header that says "a kole runtime spec"
//! version        1 byte, 1 (a newer version is refused: "upgrade the agent")
//! image          option<string>    container image; none for a process workload
//! command        seq<string>       entry point (process: program and its first arguments)
//! args           seq<string>       arguments
//! env            seq<(string, string)>  sorted by name, names unique
//! working_dir    option<string>    absolute path
//! restart        varint            0 always, 1 on-failure, 2 never
//! max_restarts   varint            restarts before the workload is Failed
//! stop_grace_ms  varint            SIGTERM → SIGKILL delay
//! config         option<string>    free-form configuration handed to the workload
//! ```
//!
//! The body is postcard, like every message (`docs/protocol.md`): strings are a varint length and
//! UTF-8 bytes, options a 0/1 byte, sequences a varint count. One spec has exactly one encoding
//! (the decoder refuses unsorted or repeated env names and trailing bytes), so equal specs have
//! equal bytes and equal digests.
//!
//! ```
//! use kole_core::protocol::DecodeLimits;
//! use kole_core::runspec::{RestartPolicy, RunSpec};
//!
//! let mut spec = RunSpec::process(["/usr/bin/cdn-cache", "--port", "8080"]);
//! spec.env.insert("CACHE_SIZE".into(), "2G".into());
//! spec.restart = RestartPolicy::Always;
//! let bytes = spec.encode()?;
//! assert_eq!(RunSpec::decode(&bytes, &DecodeLimits::default())?, spec);
//! # Ok::<(), kole_core::runspec::RunSpecError>(())
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::DecodeLimits;

/// The header every encoded [`RunSpec`] starts with.
pub const MAGIC: &[u8; 3] = b"KRS";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u8 = 1;
/// Most words in `command` and `args` together.
pub const MAX_ARGV: usize = 256;
/// Most environment variables.
pub const MAX_ENV: usize = 256;
/// Most restarts a spec may ask for.
pub const MAX_RESTARTS_LIMIT: u32 = 1_000;
/// Longest stop grace period, in milliseconds (one hour).
pub const MAX_STOP_GRACE_MS: u32 = 3_600_000;
/// Longest image reference, in bytes.
pub const MAX_IMAGE_LEN: usize = 512;
/// Longest `config`, in bytes.
pub const MAX_CONFIG_LEN: usize = 64 * 1024;
/// The prefix of the environment names the runtimes set themselves (the node's and the
/// workload's identity); a spec may not set them.
pub const RESERVED_ENV_PREFIX: &str = "KOLE_";

/// When a workload that exited is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// After every exit (a service).
    #[default]
    Always,
    /// After an exit with a failure status.
    OnFailure,
    /// Never (a job).
    Never,
}

impl RestartPolicy {
    /// The name used in specs and by container engines: `always`, `on-failure`, `never`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// What a node runs for a workload. See the [module docs](self) for the encoding.
///
/// Build one with [`RunSpec::process`] or [`RunSpec::container`], then set fields.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RunSpec {
    /// Container image (e.g. `registry.example/cdn-cache:1.4`). The container runtime needs one;
    /// the process runtime runs `command` and refuses a spec without one.
    pub image: Option<String>,
    /// Entry point: for a process, the program (looked up in `PATH` when it has no `/`) and its
    /// first arguments; for a container, it overrides the image's entry point.
    pub command: Vec<String>,
    /// Arguments, after `command`.
    pub args: Vec<String>,
    /// Environment variables. The runtimes start workloads with exactly these, plus the node's
    /// and the workload's identity (`KOLE_*`, reserved).
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute).
    pub working_dir: Option<String>,
    /// When to restart the workload after it exits. Default [`RestartPolicy::Always`].
    pub restart: RestartPolicy,
    /// Restarts (in a row, without a long healthy run between) before the workload is `Failed`.
    /// Default 5, at most [`MAX_RESTARTS_LIMIT`].
    pub max_restarts: u32,
    /// How long a stopping workload gets between SIGTERM and SIGKILL, in milliseconds. Default
    /// 10 000, at most [`MAX_STOP_GRACE_MS`].
    pub stop_grace_ms: u32,
    /// Free-form configuration handed to the workload (the runtimes write it to a file and name
    /// it in `KOLE_CONFIG_FILE`). At most [`MAX_CONFIG_LEN`] bytes.
    pub config: Option<String>,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            image: None,
            command: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            working_dir: None,
            restart: RestartPolicy::default(),
            max_restarts: 5,
            stop_grace_ms: 10_000,
            config: None,
        }
    }
}

/// Why bytes are not a usable [`RunSpec`], or a spec is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunSpecError {
    /// The bytes lack the `KRS` header.
    #[error(
        "not a kole runtime spec (no \"KRS\" header): the workload was written for another runtime, or by an older kole"
    )]
    NotARunSpec,
    /// The format version is newer than this build reads.
    #[error("runtime spec format v{found} is newer than this agent reads (v{supported}): upgrade kole-agent")]
    NewerVersion {
        /// The version in the bytes.
        found: u8,
        /// The newest this build reads.
        supported: u8,
    },
    /// The format version is not one kole ever wrote.
    #[error("runtime spec format v{0} does not exist")]
    UnknownVersion(u8),
    /// More bytes than [`DecodeLimits::max_spec_bytes`].
    #[error("runtime spec is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not decode.
    #[error("runtime spec is malformed: {0}")]
    Malformed(&'static str),
    /// A field breaks a rule.
    #[error("runtime spec field {field}: {reason}")]
    Invalid {
        /// The field (`image`, `command`, `env`, …).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RunSpecError {
    RunSpecError::Invalid { field, reason: reason.into() }
}

/// The wire body, borrowing from the input when decoding.
#[derive(Serialize, Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    image: Option<&'a str>,
    #[serde(borrow)]
    command: Vec<&'a str>,
    #[serde(borrow)]
    args: Vec<&'a str>,
    #[serde(borrow)]
    env: Vec<(&'a str, &'a str)>,
    #[serde(borrow)]
    working_dir: Option<&'a str>,
    restart: RestartPolicy,
    max_restarts: u32,
    stop_grace_ms: u32,
    #[serde(borrow)]
    config: Option<&'a str>,
}

/// Whether `name` is an environment variable name a spec may set: `[A-Za-z_.-][A-Za-z0-9_.-]*`
/// (Kubernetes' rule), not starting with [`RESERVED_ENV_PREFIX`].
fn check_env_name(name: &str, max_len: usize) -> Result<(), RunSpecError> {
    let quoted = crate::model::truncate_for_error(name);
    if name.is_empty() || name.len() > max_len {
        return Err(invalid("env", format!("name {quoted:?} must be 1 to {max_len} bytes")));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.starts_with(|c: char| c.is_ascii_digit()) || !name.chars().all(ok_char) {
        return Err(invalid(
            "env",
            format!("name {quoted:?} must be letters, digits, '_', '.' or '-', not starting with a digit"),
        ));
    }
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(invalid("env", format!("name {quoted:?} is reserved: the runtime sets KOLE_* itself")));
    }
    Ok(())
}

fn check_no_nul(field: &'static str, s: &str) -> Result<(), RunSpecError> {
    if s.contains('\0') {
        return Err(invalid(field, format!("{:?} contains a NUL byte", crate::model::truncate_for_error(s))));
    }
    Ok(())
}

impl RunSpec {
    /// A process workload: `argv[0]` is the program, the rest its arguments.
    pub fn process<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self { command: argv.into_iter().map(Into::into).collect(), ..Self::default() }
    }

    /// A container workload running `image` with its own entry point.
    pub fn container(image: impl Into<String>) -> Self {
        Self { image: Some(image.into()), ..Self::default() }
    }

    /// The full command line: `command` then `args`.
    pub fn argv(&self) -> impl Iterator<Item = &str> {
        self.command.iter().chain(&self.args).map(String::as_str)
    }

    /// Checks every rule the decoder checks, with the default limits. Runs before encoding, so a
    /// spec kole writes is one every agent reads.
    pub fn validate(&self) -> Result<(), RunSpecError> {
        self.validate_with(&DecodeLimits::default())
    }

    fn validate_with(&self, limits: &DecodeLimits) -> Result<(), RunSpecError> {
        if let Some(image) = &self.image {
            if image.is_empty() || image.len() > MAX_IMAGE_LEN {
                return Err(invalid("image", format!("must be 1 to {MAX_IMAGE_LEN} bytes")));
            }
            if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "image",
                    format!("{:?} contains whitespace or a control character", crate::model::truncate_for_error(image)),
                ));
            }
        }
        if self.image.is_none() && self.command.is_empty() {
            return Err(invalid("command", "a spec without an image needs a command (the program to run)"));
        }
        if self.command.first().is_some_and(String::is_empty) {
            return Err(invalid("command", "the program (first word) is empty"));
        }
        let argc = self.command.len() + self.args.len();
        if argc > MAX_ARGV {
            return Err(invalid("args", format!("{argc} words in command and args, more than {MAX_ARGV}")));
        }
        for word in &self.command {
            check_no_nul("command", word)?;
        }
        for word in &self.args {
            check_no_nul("args", word)?;
        }
        if self.env.len() > MAX_ENV {
            return Err(invalid("env", format!("{} variables, more than {MAX_ENV}", self.env.len())));
        }
        for (name, value) in &self.env {
            check_env_name(name, limits.max_string_len)?;
            check_no_nul("env", value)?;
        }
        if let Some(dir) = &self.working_dir {
            if !dir.starts_with('/') || dir.len() > limits.max_string_len.max(1) {
                return Err(invalid(
                    "workingDir",
                    format!("must be an absolute path of at most {} bytes", limits.max_string_len),
                ));
            }
            check_no_nul("workingDir", dir)?;
        }
        if self.max_restarts > MAX_RESTARTS_LIMIT {
            return Err(invalid("maxRestarts", format!("{} is more than {MAX_RESTARTS_LIMIT}", self.max_restarts)));
        }
        if self.stop_grace_ms > MAX_STOP_GRACE_MS {
            return Err(invalid("stopGrace", format!("{} ms is more than one hour", self.stop_grace_ms)));
        }
        if let Some(config) = &self.config
            && config.len() > MAX_CONFIG_LEN
        {
            return Err(invalid("config", format!("{} bytes, more than {MAX_CONFIG_LEN}", config.len())));
        }
        Ok(())
    }

    /// The spec's bytes (see the [module docs](self)), after [`RunSpec::validate`].
    pub fn encode(&self) -> Result<Vec<u8>, RunSpecError> {
        self.validate()?;
        let out = self.to_bytes()?;
        let max = DecodeLimits::default().max_spec_bytes;
        if out.len() > max {
            return Err(RunSpecError::TooLarge { len: out.len(), max });
        }
        Ok(out)
    }

    /// The spec's bytes, checked by neither rules nor limits (see [`RunSpec::encode`]).
    fn to_bytes(&self) -> Result<Vec<u8>, RunSpecError> {
        let body = Body {
            image: self.image.as_deref(),
            command: self.command.iter().map(String::as_str).collect(),
            args: self.args.iter().map(String::as_str).collect(),
            env: self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            working_dir: self.working_dir.as_deref(),
            restart: self.restart,
            max_restarts: self.max_restarts,
            stop_grace_ms: self.stop_grace_ms,
            config: self.config.as_deref(),
        };
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        // Serializing borrowed strings and integers into a Vec cannot fail.
        postcard::to_extend(&body, out).map_err(|_| RunSpecError::Malformed("does not serialize"))
    }

    /// Decodes and validates spec bytes under `limits` (untrusted input: every count and length is
    /// bounded before anything is copied).
    pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, RunSpecError> {
        if bytes.len() > limits.max_spec_bytes {
            return Err(RunSpecError::TooLarge { len: bytes.len(), max: limits.max_spec_bytes });
        }
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or(RunSpecError::NotARunSpec)?;
        let (&version, body) = rest.split_first().ok_or(RunSpecError::Malformed("the format version is missing"))?;
        match version {
            FORMAT_VERSION => {}
            0 => return Err(RunSpecError::UnknownVersion(0)),
            v => return Err(RunSpecError::NewerVersion { found: v, supported: FORMAT_VERSION }),
        }
        // Every sequence element takes at least one byte, so the counts postcard allocates for are
        // bounded by the (already bounded) input length.
        let (body, trailing): (Body<'_>, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| RunSpecError::Malformed(postcard_reason(&e)))?;
        if !trailing.is_empty() {
            return Err(RunSpecError::Malformed("trailing bytes after the spec"));
        }
        if body.env.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(invalid("env", "names are not sorted and unique (not the canonical encoding)"));
        }
        let spec = RunSpec {
            image: body.image.map(str::to_owned),
            command: body.command.iter().map(|s| (*s).to_owned()).collect(),
            args: body.args.iter().map(|s| (*s).to_owned()).collect(),
            env: body.env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            working_dir: body.working_dir.map(str::to_owned),
            restart: body.restart,
            max_restarts: body.max_restarts,
            stop_grace_ms: body.stop_grace_ms,
            config: body.config.map(str::to_owned),
        };
        spec.validate_with(limits)?;
        // postcard reads a number or length padded to a longer form (`80 00` for 0) as its value;
        // a spec has one encoding, so only the shortest form is taken.
        if spec.to_bytes().ok().as_deref() != Some(bytes) {
            return Err(RunSpecError::Malformed(
                "a number or length is not in its shortest form (not the canonical encoding)",
            ));
        }
        Ok(spec)
    }
}

fn postcard_reason(e: &postcard::Error) -> &'static str {
    match e {
        postcard::Error::DeserializeUnexpectedEnd => "it ends early",
        postcard::Error::DeserializeBadUtf8 => "a string is not UTF-8",
        postcard::Error::DeserializeBadEnum => "the restart policy is unknown",
        postcard::Error::DeserializeBadOption => "an optional field has a bad tag",
        postcard::Error::DeserializeBadVarint => "a number is not a valid varint",
        _ => "it does not decode",
    }
}

#[cfg(test)]
mod tests;
