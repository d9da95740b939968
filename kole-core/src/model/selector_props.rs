//! Property tests of selectors and label validation against naive reference implementations
//! written straight from Kubernetes' rules (`k8s.io/apimachinery/pkg/labels` and
//! `pkg/util/validation`), sharing no code with the implementation under test.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{
    LabelSelector, LabelSelectorRequirement, Labels, NodeName, Requirement, RequirementOp, Selector, SelectorOperator,
    validate_label_key, validate_label_value, validate_node_name,
};

// ---------------------------------------------------------------------------------------------
// Reference: selectors
// ---------------------------------------------------------------------------------------------

/// An unvalidated requirement: what a user wrote.
#[derive(Clone, Debug)]
struct RawReq {
    key: String,
    op: RequirementOp,
    values: Vec<String>,
}

/// Kubernetes' evaluation of one requirement, written out longhand.
fn ref_req_matches(r: &RawReq, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let listed = value.is_some_and(|v| r.values.iter().any(|x| x == v));
    match r.op {
        RequirementOp::In => value.is_some() && listed,
        RequirementOp::NotIn => value.is_none() || !listed,
        RequirementOp::Exists => value.is_some(),
        RequirementOp::DoesNotExist => value.is_none(),
    }
}

/// Requirements are ANDed; no requirement selects everything.
fn ref_matches(reqs: &[RawReq], labels: &BTreeMap<String, String>) -> bool {
    reqs.iter().all(|r| ref_req_matches(r, labels))
}

/// Whether upstream's `NewRequirement` accepts this requirement.
fn ref_req_valid(r: &RawReq) -> bool {
    let values_ok = match r.op {
        RequirementOp::In | RequirementOp::NotIn => !r.values.is_empty(),
        RequirementOp::Exists | RequirementOp::DoesNotExist => r.values.is_empty(),
    };
    values_ok && ref_key_valid(&r.key) && r.values.iter().all(|v| ref_value_valid(v))
}

// ---------------------------------------------------------------------------------------------
// Reference: label keys and values, as small automata over `char`s (no regex, no splitting on '.')
// ---------------------------------------------------------------------------------------------

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`: accepts when the last char read was alphanumeric.
fn ref_qualified_name_syntax(s: &str) -> bool {
    #[derive(PartialEq)]
    enum St {
        Start,
        AfterAlnum,
        AfterSymbol,
    }
    let mut st = St::Start;
    for c in s.chars() {
        let alnum = c.is_ascii_alphabetic() || c.is_ascii_digit();
        let symbol = c == '-' || c == '_' || c == '.';
        st = match (st, alnum, symbol) {
            (_, true, _) => St::AfterAlnum,
            (St::AfterAlnum | St::AfterSymbol, false, true) => St::AfterSymbol,
            _ => return false,
        };
    }
    st == St::AfterAlnum
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`
fn ref_dns1123_subdomain_syntax(s: &str) -> bool {
    #[derive(PartialEq)]
    enum St {
        LabelStart,
        AfterAlnum,
        AfterDash,
    }
    let mut st = St::LabelStart;
    for c in s.chars() {
        let alnum = c.is_ascii_lowercase() || c.is_ascii_digit();
        st = match (st, c) {
            (_, _) if alnum => St::AfterAlnum,
            (St::AfterAlnum | St::AfterDash, '-') => St::AfterDash,
            (St::AfterAlnum, '.') => St::LabelStart,
            _ => return false,
        };
    }
    st == St::AfterAlnum
}

/// Go's `len` counts bytes.
fn ref_key_valid(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() || prefix.len() > 253 || !ref_dns1123_subdomain_syntax(prefix) {
                return false;
            }
            *name
        }
        _ => return false,
    };
    !name.is_empty() && name.len() <= 63 && ref_qualified_name_syntax(name)
}

fn ref_value_valid(value: &str) -> bool {
    value.is_empty() || (value.len() <= 63 && ref_qualified_name_syntax(value))
}

/// kole's node name rule (documented on `NodeName`): 1..=128 bytes of `[A-Za-z0-9_.-]`, alphanumeric
/// at both ends — the qualified-name automaton with another length bound.
fn ref_node_name_valid(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && ref_qualified_name_syntax(name)
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

const KEYS: &[&str] = &["a", "b", "app", "tier", "example.com/zone", "x.y-z/w_1"];
const VALUES: &[&str] = &["", "1", "2", "prod", "dev", "A_b.c-9"];

fn vocab_key() -> impl Strategy<Value = String> {
    prop::sample::select(KEYS).prop_map(str::to_owned)
}

fn vocab_value() -> impl Strategy<Value = String> {
    prop::sample::select(VALUES).prop_map(str::to_owned)
}

fn label_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(vocab_key(), vocab_value(), 0..=KEYS.len())
}

fn any_op() -> impl Strategy<Value = RequirementOp> {
    prop_oneof![
        Just(RequirementOp::In),
        Just(RequirementOp::NotIn),
        Just(RequirementOp::Exists),
        Just(RequirementOp::DoesNotExist),
    ]
}

/// A requirement that upstream accepts (values only and always for In / NotIn, duplicates allowed).
fn valid_raw_req() -> impl Strategy<Value = RawReq> {
    (vocab_key(), any_op(), prop::collection::vec(vocab_value(), 1..4)).prop_map(|(key, op, values)| {
        let values = match op {
            RequirementOp::In | RequirementOp::NotIn => values,
            RequirementOp::Exists | RequirementOp::DoesNotExist => Vec::new(),
        };
        RawReq { key, op, values }
    })
}

/// A requirement that may break the value-count rule or carry an invalid key or value.
fn maybe_invalid_raw_req() -> impl Strategy<Value = RawReq> {
    let key = prop_oneof![4 => vocab_key(), 1 => prop::sample::select(&["", "-a", "A/b", "a/b/c", "é"][..]).prop_map(str::to_owned)];
    let value =
        prop_oneof![6 => vocab_value(), 1 => prop::sample::select(&["-x", "a b", "x/y"][..]).prop_map(str::to_owned)];
    (key, any_op(), prop::collection::vec(value, 0..3)).prop_map(|(key, op, values)| RawReq { key, op, values })
}

fn build(reqs: &[RawReq]) -> Selector {
    Selector::from_requirements(
        reqs.iter().map(|r| Requirement::new(r.key.clone(), r.op, r.values.clone()).unwrap()).collect(),
    )
}

/// Strings biased towards the boundaries of Kubernetes' rules: lengths around 63 and 253, and
/// characters that are legal in one part but not the other.
fn boundary_string(lens: &'static [usize]) -> impl Strategy<Value = String> {
    const ODD: &[char] = &['a', 'Z', '0', '-', '_', '.', '/', 'é', ' ', '\u{0}', '日', 'A'];
    (prop::sample::select(lens), prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(ODD)), 0..3))
        .prop_map(|(len, edits)| {
            let mut chars = vec!['a'; len];
            for (at, c) in edits {
                if !chars.is_empty() {
                    chars[at.index(len)] = c;
                }
            }
            chars.into_iter().collect()
        })
}

fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-zA-Z0-9._/ é-]{0,10}", boundary_string(&[0, 1, 2, 62, 63, 64, 65, 127, 128, 129]),]
}

fn key_like() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        "[a-z0-9.-]{0,12}",
        "[a-zA-Z0-9._/-]{0,6}",
        boundary_string(&[0, 1, 63, 64, 252, 253, 254]).prop_map(|s| dotted(&s)),
    ];
    prop_oneof![name_like(), (prefix, name_like()).prop_map(|(p, n)| format!("{p}/{n}")),]
}

/// Turns every 20th character into a `.`, so long prefixes are multi-label DNS names.
fn dotted(s: &str) -> String {
    s.chars().enumerate().map(|(i, c)| if i % 20 == 19 { '.' } else { c }).collect()
}

/// The ways the string form can spell one requirement, with optional whitespace.
fn spelled(r: &RawReq, style: u8, ws: &str) -> String {
    let list = |vs: &[String]| vs.join(&format!(",{ws}"));
    match (r.op, r.values.len(), style % 3) {
        (RequirementOp::In, 1, 0) => format!("{}{ws}={ws}{}", r.key, r.values[0]),
        (RequirementOp::In, 1, 1) => format!("{}{ws}=={ws}{}", r.key, r.values[0]),
        (RequirementOp::NotIn, 1, 0 | 1) => format!("{}{ws}!={ws}{}", r.key, r.values[0]),
        (RequirementOp::In, _, _) => format!("{} in{ws}({ws}{}{ws})", r.key, list(&r.values)),
        (RequirementOp::NotIn, _, _) => format!("{} notin{ws}({ws}{}{ws})", r.key, list(&r.values)),
        (RequirementOp::Exists, _, _) => r.key.clone(),
        (RequirementOp::DoesNotExist, _, _) => format!("!{ws}{}", r.key),
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `Selector::matches` (and `Requirement::matches`) agree with the reference on every label set.
    #[test]
    fn selector_matches_like_reference(reqs in prop::collection::vec(valid_raw_req(), 0..5), labels in label_map()) {
        let s = build(&reqs);
        prop_assert_eq!(s.matches(&labels), ref_matches(&reqs, &labels));
        let typed = Labels::try_from(labels.clone()).unwrap();
        prop_assert_eq!(s.matches(&typed), ref_matches(&reqs, &labels));
        for raw in &reqs {
            let r = Requirement::new(raw.key.clone(), raw.op, raw.values.clone()).unwrap();
            prop_assert_eq!(r.matches(&labels), ref_req_matches(raw, &labels));
        }
        if reqs.is_empty() {
            prop_assert!(s.is_everything() && s.matches(&labels));
        }
    }

    /// `Requirement::new` accepts exactly what upstream's `NewRequirement` accepts.
    #[test]
    fn requirement_validation_like_reference(raw in maybe_invalid_raw_req()) {
        let r = Requirement::new(raw.key.clone(), raw.op, raw.values.clone());
        prop_assert_eq!(r.is_ok(), ref_req_valid(&raw), "{:?} gave {:?}", raw, r);
    }

    /// Display writes the string form that parses back to the same selector.
    #[test]
    fn display_parse_round_trip(reqs in prop::collection::vec(valid_raw_req(), 0..5)) {
        let s = build(&reqs);
        let text = s.to_string();
        prop_assert_eq!(Selector::parse(&text), Ok(s), "text {:?}", text);
    }

    /// Every spelling of the string form (`=`, `==`, `!=`, `in`, `notin`, `!k`, `k`, spaces)
    /// parses to a selector that evaluates like the requirements it spells.
    #[test]
    fn parsed_spellings_match_like_reference(
        reqs in prop::collection::vec((valid_raw_req(), any::<u8>()), 1..5),
        ws in prop::sample::select(&["", " ", "  ", "\t"][..]),
        labels in label_map(),
    ) {
        let text = reqs.iter().map(|(r, style)| spelled(r, *style, ws)).collect::<Vec<_>>().join(&format!("{ws},{ws}"));
        let text = format!("{ws}{text}{ws}");
        let parsed = Selector::parse(&text);
        prop_assert!(parsed.is_ok(), "{:?} gave {:?}", text, parsed);
        let raws: Vec<RawReq> = reqs.into_iter().map(|(r, _)| r).collect();
        let parsed = parsed.unwrap();
        prop_assert_eq!(parsed.matches(&labels), ref_matches(&raws, &labels), "text {:?}", text);
        prop_assert_eq!(parsed, build(&raws));
    }

    /// Parsing arbitrary text never panics, and whatever parses prints and parses back unchanged.
    #[test]
    fn parse_never_panics(text in prop_oneof![
        any::<String>(),
        "[a-z!=(), \t<>/.é-]{0,24}",
        "[ab]{0,2}( ?(in|notin|=|==|!=|!) ?[(]?[ab,]{0,4}[)]?,?){0,4}",
    ]) {
        if let Ok(s) = Selector::parse(&text) {
            let again = s.to_string();
            prop_assert_eq!(Selector::parse(&again), Ok(s), "{:?} printed as {:?}", text, again);
        }
    }

    /// `metav1.LabelSelector` converts like upstream's `LabelSelectorAsSelector`: `matchLabels` are
    /// equality requirements ANDed with `matchExpressions`; invalid entries are rejected.
    #[test]
    fn label_selector_conversion_like_reference(
        match_labels in prop::collection::btree_map(
            prop_oneof![4 => vocab_key(), 1 => Just("Bad Key".to_owned())],
            prop_oneof![6 => vocab_value(), 1 => Just("-bad".to_owned())],
            0..3,
        ),
        exprs in prop::collection::vec(maybe_invalid_raw_req(), 0..4),
        labels in label_map(),
    ) {
        let ls = LabelSelector {
            match_labels: match_labels.clone(),
            match_expressions: exprs
                .iter()
                .map(|r| LabelSelectorRequirement {
                    key: r.key.clone(),
                    operator: match r.op {
                        RequirementOp::In => SelectorOperator::In,
                        RequirementOp::NotIn => SelectorOperator::NotIn,
                        RequirementOp::Exists => SelectorOperator::Exists,
                        RequirementOp::DoesNotExist => SelectorOperator::DoesNotExist,
                    },
                    values: r.values.clone(),
                })
                .collect(),
        };
        let mut raws: Vec<RawReq> = match_labels
            .into_iter()
            .map(|(key, v)| RawReq { key, op: RequirementOp::In, values: vec![v] })
            .collect();
        raws.extend(exprs);
        let converted = Selector::try_from(&ls);
        prop_assert_eq!(converted.is_ok(), raws.iter().all(ref_req_valid), "{:?} gave {:?}", ls, converted);
        if let Ok(s) = converted {
            prop_assert_eq!(s.matches(&labels), ref_matches(&raws, &labels));
            // Through the serde form too: a deserialized selector is revalidated to the same value.
            let bytes = postcard::to_allocvec(&s).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Selector>(&bytes).unwrap(), s);
        }
    }

    /// Label key validation agrees with the reference on arbitrary and boundary strings.
    #[test]
    fn label_keys_like_reference(key in key_like()) {
        prop_assert_eq!(validate_label_key(&key).is_ok(), ref_key_valid(&key), "{:?}", key);
    }

    /// Label value validation agrees with the reference on arbitrary and boundary strings.
    #[test]
    fn label_values_like_reference(value in name_like()) {
        prop_assert_eq!(validate_label_value(&value).is_ok(), ref_value_valid(&value), "{:?}", value);
    }

    /// Every way into a `Labels` (insert, from_pairs, a map, deserialization) validates alike.
    #[test]
    fn labels_construction_like_reference(pairs in prop::collection::vec((prop_oneof![vocab_key(), key_like()], prop_oneof![vocab_value(), name_like()]), 0..4)) {
        let map: BTreeMap<String, String> = pairs.iter().cloned().collect();
        let valid = map.iter().all(|(k, v)| ref_key_valid(k) && ref_value_valid(v));
        prop_assert_eq!(Labels::try_from(map.clone()).is_ok(), valid);
        let mut by_insert = Labels::new();
        let inserted = pairs.iter().try_for_each(|(k, v)| by_insert.insert(k.clone(), v.clone()));
        prop_assert_eq!(inserted.is_ok(), pairs.iter().all(|(k, v)| ref_key_valid(k) && ref_value_valid(v)));
        prop_assert_eq!(Labels::from_pairs(pairs.clone()).is_ok(), inserted.is_ok());
        let bytes = postcard::to_allocvec(&map).unwrap();
        let decoded = postcard::from_bytes::<Labels>(&bytes);
        prop_assert_eq!(decoded.is_ok(), valid);
        if let Ok(labels) = decoded {
            let back: BTreeMap<String, String> = labels.into();
            prop_assert_eq!(back, map);
        }
    }

    /// Node name validation agrees with the documented rule.
    #[test]
    fn node_names_like_reference(name in name_like()) {
        prop_assert_eq!(validate_node_name(&name).is_ok(), ref_node_name_valid(&name), "{:?}", name);
        prop_assert_eq!(NodeName::new(name.clone()).is_ok(), ref_node_name_valid(&name));
    }
}

/// Whitespace is what upstream's lexer skips (`' '`, `'\t'`, `'\r'`, `'\n'`); anything else, such as a
/// form feed, stays part of a word and so makes the key or value invalid.
#[test]
fn only_upstream_whitespace_separates_tokens() {
    let want = Selector::parse("a=b,c in (d,e)").unwrap();
    assert_eq!(Selector::parse("\r\na\t=\nb ,\r\nc in\t(\nd,\re )\n"), Ok(want));
    for bad in ["a\x0c=b", "a=b\x0c", "\x0ca", "a in\x0c(b)", "a\u{a0}=b"] {
        assert!(Selector::parse(bad).is_err(), "{bad:?}");
    }
}

/// The reference automata themselves, on the cases Kubernetes' own validation tests list.
#[test]
fn reference_agrees_with_upstream_examples() {
    for ok in [
        "simple",
        "now-with-dashes",
        "1-starts-with-num",
        "1234",
        "simple/simple",
        "now-with-dashes/simple",
        "now-with-dashes/now-with-dashes",
        "now.with.dots/simple",
        "now-with.dashes-and.dots/simple",
        "1-num.2-num/3-num",
        "1234/5678",
        "1.2.3.4/5678",
        "Uppercase_Is_OK_123",
        "example.com/Uppercase_Is_OK_123",
        "requests.storage-foo",
        &"a".repeat(63),
        &format!("{}/b", "a".repeat(253)),
    ] {
        assert!(ref_key_valid(ok), "{ok}");
    }
    for bad in [
        "nospecialchars%^=@",
        "cantendwithadash-",
        "-cantstartwithadash-",
        "only/one/slash",
        "Example.com/abc",
        "example_com/abc",
        "example.com/",
        "/simple",
        &"a".repeat(64),
        &format!("{}/b", "a".repeat(254)),
    ] {
        assert!(!ref_key_valid(bad), "{bad}");
    }
    for ok in ["", "simple", "now-with-dashes", "1-starts-with-num", "end-with-num-1", "1234", &"a".repeat(63)] {
        assert!(ref_value_valid(ok), "{ok}");
    }
    for bad in [
        "nospecialchars%^=@",
        "Tama-nui-te-rā.is.Māori.sun",
        "\\backslashes\\are\\bad",
        "-starts-with-dash",
        "ends-with-dash-",
        ".starts.with.dot",
        "ends.with.dot.",
        &"a".repeat(64),
    ] {
        assert!(!ref_value_valid(bad), "{bad}");
    }
}
