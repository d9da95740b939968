//! Runnable assemblies of kole (see the `examples` of this package), and the small command-line
//! parser they share ([`Flags`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A command-line error: which flag and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagError(pub String);

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FlagError {}

/// `--key value` / `--key=value` options (a key may repeat) and `--switch` flags.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    values: BTreeMap<String, Vec<String>>,
    switches: Vec<String>,
}

impl Flags {
    /// Parses `argv` (without the program name). `switches` lists the flags that take no value;
    /// `known` lists the options that take one. Anything else is an error.
    pub fn parse(
        argv: impl IntoIterator<Item = String>,
        switches: &[&str],
        known: &[&str],
    ) -> Result<Self, FlagError> {
        let mut flags = Self::default();
        let mut it = argv.into_iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(FlagError(format!("unexpected argument {a:?} (options start with --)")));
            };
            let (key, value) = match name.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (name.to_owned(), None),
            };
            if switches.contains(&key.as_str()) && value.is_none() {
                flags.switches.push(key);
            } else if known.contains(&key.as_str()) {
                let value = match value {
                    Some(v) => v,
                    None => it.next().ok_or_else(|| FlagError(format!("--{key} needs a value")))?,
                };
                flags.values.entry(key).or_default().push(value);
            } else {
                return Err(FlagError(format!("unknown option --{key}")));
            }
        }
        Ok(flags)
    }

    /// Whether `--name` was given.
    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// Every value of `--name`, in order.
    pub fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map_or(&[], Vec::as_slice)
    }

    /// The last value of `--name`, parsed, if given.
    pub fn get<T: FromStr>(&self, name: &str) -> Result<Option<T>, FlagError>
    where
        T::Err: fmt::Display,
    {
        match self.all(name).last() {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e| FlagError(format!("--{name} {v}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_repeated_options_and_switches() {
        let f = Flags::parse(argv("--broker a:1 --broker=b:2 --dry-run --name n"), &["dry-run"], &["broker", "name"])
            .unwrap();
        assert_eq!(f.all("broker"), ["a:1", "b:2"]);
        assert!(f.switch("dry-run"));
        assert_eq!(f.get::<String>("name").unwrap().as_deref(), Some("n"));
        assert!(Flags::parse(argv("--typo 1"), &[], &["name"]).is_err());
        assert!(Flags::parse(argv("--name"), &[], &["name"]).is_err());
    }
}
