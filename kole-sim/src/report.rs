//! Benchmark reports: a readable table with the KOLE paper's figures beside kole's, and one JSON
//! line for machines.

use std::borrow::Cow;
use std::fmt::Write as _;

/// One value in a report, kept typed so the JSON is exact and the table readable.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer.
    Int(u64),
    /// A real number.
    Float(f64),
    /// A string.
    Str(String),
}

/// Ordered key/value figures of one run, serialized as one JSON object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    entries: Vec<(Cow<'static, str>, Value)>,
}

impl Figures {
    /// Sets an integer figure.
    pub fn int(&mut self, key: &'static str, v: u64) {
        self.set(key, Value::Int(v));
    }

    /// Sets a real figure.
    pub fn float(&mut self, key: &'static str, v: f64) {
        self.set(key, Value::Float(v));
    }

    /// Sets a string figure.
    pub fn str(&mut self, key: &'static str, v: impl Into<String>) {
        self.set(key, Value::Str(v.into()));
    }

    fn set(&mut self, key: &'static str, v: Value) {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = v,
            None => self.entries.push((Cow::Borrowed(key), v)),
        }
    }

    /// The figures of one [`Figures::to_json`] line (keys sorted; a `null` is an unmeasured real
    /// number); `None` when the line is not a flat JSON object of such values.
    pub fn from_json(line: &str) -> Option<Figures> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).ok()?;
        let mut entries = Vec::with_capacity(map.len());
        for (k, v) in map {
            let v = match v {
                serde_json::Value::Number(n) => match n.as_u64() {
                    Some(i) => Value::Int(i),
                    None => Value::Float(n.as_f64()?),
                },
                serde_json::Value::String(t) => Value::Str(t),
                serde_json::Value::Null => Value::Float(f64::NAN),
                _ => return None,
            };
            entries.push((Cow::Owned(k), v));
        }
        Some(Figures { entries })
    }

    /// A figure by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// A numeric figure as `f64`.
    pub fn num(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Str(_) => None,
        }
    }

    /// One-line JSON object, keys in insertion order.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "\"{k}\":");
            match v {
                Value::Int(n) => {
                    let _ = write!(s, "{n}");
                }
                Value::Float(f) if f.is_finite() => {
                    let _ = write!(s, "{}", (f * 1e6).round() / 1e6);
                }
                Value::Float(_) => s.push_str("null"),
                Value::Str(t) => json_string(&mut s, t),
            }
        }
        s.push('}');
        s
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A readable table: rows of (figure, kole, KOLE paper, target).
#[derive(Clone, Debug, Default)]
pub struct Table {
    title: String,
    rows: Vec<[String; 4]>,
    header: [&'static str; 4],
}

impl Table {
    /// A table with a title line.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            rows: Vec::new(),
            header: ["figure", "kole (measured)", "KOLE (paper)", "kole target"],
        }
    }

    /// Renames the column headers (an empty last header drops the target column).
    pub fn with_header(mut self, header: [&'static str; 4]) -> Self {
        self.header = header;
        self
    }

    /// Adds a row.
    pub fn row(&mut self, figure: &str, kole: String, paper: &str, target: &str) {
        self.rows.push([figure.to_owned(), kole, paper.to_owned(), target.to_owned()]);
    }

    /// Renders with aligned columns.
    pub fn render(&self) -> String {
        let header = self.header;
        let cols = if header[3].is_empty() { 3 } else { 4 };
        let mut w = header.map(str::len);
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut s = format!("{}\n", self.title);
        let line = |s: &mut String, cells: [&str; 4]| {
            let _ =
                write!(s, "  {:<w0$}  {:>w1$}  {:>w2$}", cells[0], cells[1], cells[2], w0 = w[0], w1 = w[1], w2 = w[2]);
            if cols == 4 {
                let _ = write!(s, "  {:>w3$}", cells[3], w3 = w[3]);
            }
            s.push('\n');
        };
        line(&mut s, header);
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        line(&mut s, [&rule[0], &rule[1], &rule[2], &rule[3]]);
        for r in &self.rows {
            line(&mut s, [&r[0], &r[1], &r[2], &r[3]]);
        }
        s
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in KiB/MiB/GiB with one decimal.
pub fn bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f < K {
        format!("{n} B")
    } else if f < K * K {
        format!("{:.1} KiB", f / K)
    } else if f < K * K * K {
        format!("{:.1} MiB", f / K / K)
    } else {
        format!("{:.2} GiB", f / K / K / K)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_one_line_and_escaped() {
        let mut f = Figures::default();
        f.int("nodes", 1_000_000);
        f.float("restore_s", 0.123_456_78);
        f.str("codec", "gz\"ip");
        f.int("nodes", 5);
        assert_eq!(f.to_json(), r#"{"nodes":5,"restore_s":0.123457,"codec":"gz\"ip"}"#);
    }

    #[test]
    fn json_reads_back() {
        let mut f = Figures::default();
        f.int("nodes", 1_000_000);
        f.float("restore_s", 0.25);
        f.float("unmeasured_s", f64::NAN);
        f.str("codec", "gz\"ip");
        let back = Figures::from_json(&f.to_json()).expect("own line");
        assert_eq!(back.get("nodes"), Some(&Value::Int(1_000_000)));
        assert_eq!(back.num("restore_s"), Some(0.25));
        assert!(back.num("unmeasured_s").is_some_and(f64::is_nan));
        assert_eq!(back.get("codec"), Some(&Value::Str("gz\"ip".into())));
        for bad in ["", "[1]", "{\"a\":[1]}", "{\"a\":{}}", "not json", "{\"a\":true}"] {
            assert_eq!(Figures::from_json(bad), None, "{bad}");
        }
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(bytes(1536), "1.5 KiB");
        let mut t = Table::new("t");
        t.row("a", "1".into(), "2", "3");
        assert!(t.render().contains("KOLE (paper)"));
    }
}
