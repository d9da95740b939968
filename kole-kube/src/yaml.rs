//! A small, deterministic YAML emitter for JSON values (the CRD manifests in `deploy/`), so the
//! checked-in YAML needs no YAML library.

use serde_json::Value;

/// Renders `value` as a YAML document (block style, keys in the value's order).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    emit(value, 0, &mut out, false);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn emit(value: &Value, indent: usize, out: &mut String, inline_first: bool) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (i, (k, v)) in map.iter().enumerate() {
                if !(i == 0 && inline_first) {
                    out.push_str(&pad);
                }
                out.push_str(&scalar_str(k));
                out.push(':');
                emit_child(v, indent, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                if !(i == 0 && inline_first) {
                    out.push_str(&pad);
                }
                match v {
                    Value::Object(m) if !m.is_empty() => {
                        out.push_str("- ");
                        emit(v, indent + 2, out, true)
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push_str("-\n");
                        emit(v, indent + 2, out, false)
                    }
                    _ => {
                        out.push_str("- ");
                        out.push_str(&scalar(v));
                        out.push('\n');
                    }
                }
            }
        }
        _ => {
            out.push_str(&scalar(value));
            out.push('\n');
        }
    }
}

fn emit_child(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            emit(v, indent + 2, out, false);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            emit(v, indent, out, false);
        }
        _ => {
            out.push(' ');
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar_str(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string plain when YAML reads it back as the same string, JSON-quoted otherwise.
fn scalar_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'/' || c == b'_')
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/' | b' '))
        && !s.ends_with(' ')
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n" | "~"
        );
    if plain { s.to_owned() } else { serde_json::Value::String(s.to_owned()).to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_nested_values() {
        let v = serde_json::json!({
            "a": 1, "b": "yes", "c": [ {"x": "1", "y": []}, "s p", [true] ], "d": {}, "e": {"f": null}
        });
        let y = to_yaml(&v);
        assert_eq!(y, "a: 1\nb: \"yes\"\nc:\n- x: \"1\"\n  \"y\": []\n- s p\n-\n  - true\nd: {}\ne:\n  f: null\n");
    }
}
