//! A small, dependency-free command-line parser for the `kole-sim` binary.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A command-line error, printed with the usage text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parsed arguments: positional words, `--key value` options and `--flag` switches.
#[derive(Debug, Default, Clone)]
pub struct Args {
    /// Positional words in order (sub-commands).
    pub words: Vec<String>,
    options: BTreeMap<String, String>,
    flags: Vec<String>,
    used: std::cell::RefCell<Vec<String>>,
}

impl Args {
    /// Parses `argv` (without the program name). `switches` lists the options that take no value.
    pub fn parse(argv: impl IntoIterator<Item = String>, switches: &[&str]) -> Result<Self, UsageError> {
        let mut args = Args::default();
        let mut it = argv.into_iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    args.options.insert(k.to_owned(), v.to_owned());
                } else if switches.contains(&name) {
                    args.flags.push(name.to_owned());
                } else {
                    let v = it.next().ok_or_else(|| UsageError(format!("--{name} needs a value")))?;
                    args.options.insert(name.to_owned(), v);
                }
            } else {
                args.words.push(a);
            }
        }
        Ok(args)
    }

    /// Whether `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.used.borrow_mut().push(name.to_owned());
        self.flags.iter().any(|f| f == name)
    }

    /// The value of `--name`, parsed, or `default`.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, UsageError>
    where
        T::Err: fmt::Display,
    {
        Ok(self.get_opt(name)?.unwrap_or(default))
    }

    /// The value of `--name`, parsed, if given.
    pub fn get_opt<T: FromStr>(&self, name: &str) -> Result<Option<T>, UsageError>
    where
        T::Err: fmt::Display,
    {
        self.used.borrow_mut().push(name.to_owned());
        match self.options.get(name) {
            None => Ok(None),
            Some(v) => {
                let v = v.replace('_', "");
                v.parse().map(Some).map_err(|e| UsageError(format!("--{name} {v}: {e}")))
            }
        }
    }

    /// Fails on any option or switch no `get`/`flag` call asked for (typos, stale flags).
    pub fn reject_unknown(&self) -> Result<(), UsageError> {
        let used = self.used.borrow();
        for k in self.options.keys().chain(self.flags.iter()) {
            if !used.iter().any(|u| u == k) {
                return Err(UsageError(format!("unknown option --{k}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_words_options_and_switches() {
        let a = Args::parse(argv("bench --nodes 1_000_000 --json --codec=lz4"), &["json"]).unwrap();
        assert_eq!(a.words, ["bench"]);
        assert_eq!(a.get("nodes", 0usize).unwrap(), 1_000_000);
        assert_eq!(a.get("codec", String::new()).unwrap(), "lz4");
        assert!(a.flag("json"));
        assert!(a.reject_unknown().is_ok());
    }

    #[test]
    fn reports_bad_and_unknown_options() {
        let a = Args::parse(argv("--nodes many --typo 3"), &[]).unwrap();
        assert!(a.get("nodes", 0usize).is_err());
        assert!(a.reject_unknown().unwrap_err().0.contains("typo"));
        assert!(Args::parse(argv("--nodes"), &[]).is_err());
    }
}
