//! Kubernetes label selectors: `matchLabels`, `matchExpressions` and the `kubectl -l` string form.
//!
//! Semantics follow `k8s.io/apimachinery` exactly: requirements are ANDed; `In` and `=` need the key
//! present with one of the values; `NotIn` and `!=` match when the key is absent *or* its value is
//! not listed; `Exists` / `DoesNotExist` test presence only. An empty selector selects everything.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ValidationError;
use super::labels::{LabelLookup, validate_label_key, validate_label_value};

/// Operator of a `matchExpressions` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOperator {
    /// The key is present and its value is one of `values`.
    In,
    /// The key is absent, or its value is none of `values`.
    NotIn,
    /// The key is present (any value).
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry, as written in a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelSelectorRequirement {
    /// Label key the requirement tests.
    pub key: String,
    /// How the key's value is tested.
    pub operator: SelectorOperator,
    /// Values for `In` / `NotIn`; must be empty for `Exists` / `DoesNotExist`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector as written in a Kubernetes object (`metav1.LabelSelector`).
///
/// Convert it into a [`Selector`] with [`Selector::try_from`] to validate and evaluate it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// `key: value` pairs, each equivalent to an `In` requirement with one value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// The test one [`Requirement`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RequirementOp {
    /// Present with a listed value (`in`, `=`, `==`, `matchLabels`).
    In,
    /// Absent or with an unlisted value (`notin`, `!=`).
    NotIn,
    /// Present.
    Exists,
    /// Absent.
    DoesNotExist,
}

/// One validated requirement of a [`Selector`]. Values are sorted and de-duplicated.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Requirement {
    key: String,
    op: RequirementOp,
    values: Vec<String>,
}

impl Requirement {
    /// Validates and builds a requirement.
    pub fn new(key: impl Into<String>, op: RequirementOp, values: Vec<String>) -> Result<Self, ValidationError> {
        let key = key.into();
        validate_label_key(&key)?;
        let bad = |reason: &'static str| ValidationError::Selector { key: key.clone(), reason };
        match op {
            RequirementOp::In | RequirementOp::NotIn if values.is_empty() => {
                return Err(bad("values must be specified when operator is In or NotIn"));
            }
            RequirementOp::Exists | RequirementOp::DoesNotExist if !values.is_empty() => {
                return Err(bad("values must be empty when operator is Exists or DoesNotExist"));
            }
            _ => {}
        }
        for v in &values {
            validate_label_value(v)?;
        }
        let mut values = values;
        values.sort_unstable();
        values.dedup();
        Ok(Self { key, op, values })
    }

    /// The label key tested.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn op(&self) -> RequirementOp {
        self.op
    }

    /// The sorted values (empty for `Exists` / `DoesNotExist`).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// Whether a label set satisfies this requirement.
    pub fn matches(&self, labels: &(impl LabelLookup + ?Sized)) -> bool {
        let value = labels.label(&self.key);
        match self.op {
            RequirementOp::In => value.is_some_and(|v| self.has_value(v)),
            RequirementOp::NotIn => value.is_none_or(|v| !self.has_value(v)),
            RequirementOp::Exists => value.is_some(),
            RequirementOp::DoesNotExist => value.is_none(),
        }
    }

    fn has_value(&self, v: &str) -> bool {
        self.values.binary_search_by(|x| x.as_str().cmp(v)).is_ok()
    }
}

/// A validated, ready-to-evaluate label selector: requirements ANDed, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<Requirement>", into = "Vec<Requirement>")]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector with no requirements: it selects every node.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from requirements.
    pub fn from_requirements(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Self { requirements }
    }

    /// Whether this selector has no requirements (and so selects everything).
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a label set satisfies every requirement.
    pub fn matches(&self, labels: &(impl LabelLookup + ?Sized)) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Parses the string form used by `kubectl -l` and the API's `labelSelector` parameter:
    /// comma-separated `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` and `!k`.
    pub fn parse(input: &str) -> Result<Self, ValidationError> {
        Parser { s: input.as_bytes(), pos: 0, input }.parse()
    }
}

impl TryFrom<Vec<Requirement>> for Selector {
    type Error = ValidationError;
    fn try_from(reqs: Vec<Requirement>) -> Result<Self, Self::Error> {
        // Revalidate: deserialized requirements bypassed `Requirement::new`.
        let reqs = reqs.into_iter().map(|r| Requirement::new(r.key, r.op, r.values)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_requirements(reqs))
    }
}

impl From<Selector> for Vec<Requirement> {
    fn from(s: Selector) -> Self {
        s.requirements
    }
}

impl TryFrom<&LabelSelector> for Selector {
    type Error = ValidationError;
    fn try_from(ls: &LabelSelector) -> Result<Self, Self::Error> {
        let mut reqs = Vec::with_capacity(ls.match_labels.len() + ls.match_expressions.len());
        for (k, v) in &ls.match_labels {
            reqs.push(Requirement::new(k.clone(), RequirementOp::In, vec![v.clone()])?);
        }
        for e in &ls.match_expressions {
            let op = match e.operator {
                SelectorOperator::In => RequirementOp::In,
                SelectorOperator::NotIn => RequirementOp::NotIn,
                SelectorOperator::Exists => RequirementOp::Exists,
                SelectorOperator::DoesNotExist => RequirementOp::DoesNotExist,
            };
            reqs.push(Requirement::new(e.key.clone(), op, e.values.clone())?);
        }
        Ok(Self::from_requirements(reqs))
    }
}

impl TryFrom<LabelSelector> for Selector {
    type Error = ValidationError;
    fn try_from(ls: LabelSelector) -> Result<Self, Self::Error> {
        Self::try_from(&ls)
    }
}

impl fmt::Display for Selector {
    /// Writes the `kubectl -l` form, which [`Selector::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r.op {
                RequirementOp::In if r.values.len() == 1 => write!(f, "{}={}", r.key, r.values[0])?,
                RequirementOp::In => write!(f, "{} in ({})", r.key, r.values.join(","))?,
                RequirementOp::NotIn => write!(f, "{} notin ({})", r.key, r.values.join(","))?,
                RequirementOp::Exists => write!(f, "{}", r.key)?,
                RequirementOp::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// The whitespace of upstream's selector lexer; unlike `u8::is_ascii_whitespace`, not form feed.
fn is_selector_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    input: &'a str,
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> ValidationError {
        ValidationError::SelectorSyntax {
            input: super::name::truncate_for_error(self.input),
            position: self.pos,
            reason,
        }
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && is_selector_space(self.s[self.pos]) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, tok: &str) -> bool {
        if self.s[self.pos..].starts_with(tok.as_bytes()) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    /// A key or value: a run of characters that are not separators or operators.
    fn word(&mut self) -> &str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if is_selector_space(c) || matches!(c, b',' | b'=' | b'!' | b'(' | b')' | b'<' | b'>') {
                break;
            }
            self.pos += 1;
        }
        // Every byte consumed is ASCII or part of a UTF-8 sequence left whole (we stop only at ASCII).
        &self.input[start..self.pos]
    }

    /// True when the next word is exactly `kw` followed by whitespace or `(`.
    fn keyword(&mut self, kw: &str) -> bool {
        let rest = &self.s[self.pos..];
        if rest.starts_with(kw.as_bytes()) && rest.get(kw.len()).is_some_and(|&c| is_selector_space(c) || c == b'(') {
            self.pos += kw.len();
            true
        } else {
            false
        }
    }

    fn value_list(&mut self) -> Result<Vec<String>, ValidationError> {
        self.skip_ws();
        if !self.eat("(") {
            return Err(self.err("expected '(' to open a value list"));
        }
        let mut values = Vec::new();
        loop {
            self.skip_ws();
            let v = self.word().to_owned();
            values.push(v);
            self.skip_ws();
            if self.eat(",") {
                continue;
            }
            if self.eat(")") {
                break;
            }
            return Err(self.err("expected ',' or ')' in a value list"));
        }
        Ok(values)
    }

    fn parse(mut self) -> Result<Selector, ValidationError> {
        let mut reqs = Vec::new();
        self.skip_ws();
        if self.pos == self.s.len() {
            return Ok(Selector::everything());
        }
        loop {
            self.skip_ws();
            let req = if self.eat("!") {
                self.skip_ws();
                let key = self.word().to_owned();
                Requirement::new(key, RequirementOp::DoesNotExist, vec![])?
            } else {
                let key = self.word().to_owned();
                if key.is_empty() {
                    return Err(self.err("expected a label key"));
                }
                self.skip_ws();
                if self.eat("==") || self.eat("=") {
                    self.skip_ws();
                    let v = self.word().to_owned();
                    Requirement::new(key, RequirementOp::In, vec![v])?
                } else if self.eat("!=") {
                    self.skip_ws();
                    let v = self.word().to_owned();
                    Requirement::new(key, RequirementOp::NotIn, vec![v])?
                } else if self.keyword("in") {
                    let values = self.value_list()?;
                    Requirement::new(key, RequirementOp::In, values)?
                } else if self.keyword("notin") {
                    let values = self.value_list()?;
                    Requirement::new(key, RequirementOp::NotIn, values)?
                } else if matches!(self.peek(), Some(b'<' | b'>')) {
                    return Err(self.err("'<' and '>' are not supported by label selectors on workloads"));
                } else if matches!(self.peek(), None | Some(b',')) {
                    Requirement::new(key, RequirementOp::Exists, vec![])?
                } else {
                    return Err(self.err("expected an operator: =, ==, !=, in, notin"));
                }
            };
            reqs.push(req);
            self.skip_ws();
            if self.pos == self.s.len() {
                break;
            }
            if !self.eat(",") {
                return Err(self.err("expected ',' between requirements"));
            }
        }
        Ok(Selector::from_requirements(reqs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied()).unwrap()
    }

    // The cases of the Kubernetes documentation, "Labels and Selectors".
    #[test]
    fn upstream_documented_set_based_cases() {
        let prod = labels(&[("environment", "production"), ("tier", "cache")]);
        let qa = labels(&[("environment", "qa"), ("partition", "customerA")]);
        let dev = labels(&[("environment", "dev"), ("tier", "frontend")]);
        let bare = labels(&[]);

        let s = Selector::parse("environment in (production, qa)").unwrap();
        assert!(s.matches(&prod) && s.matches(&qa) && !s.matches(&dev) && !s.matches(&bare));

        // notin also selects resources that do not have the key at all.
        let s = Selector::parse("tier notin (frontend, backend)").unwrap();
        assert!(s.matches(&prod) && s.matches(&qa) && !s.matches(&dev) && s.matches(&bare));

        let s = Selector::parse("partition").unwrap();
        assert!(s.matches(&qa) && !s.matches(&prod));
        let s = Selector::parse("!partition").unwrap();
        assert!(!s.matches(&qa) && s.matches(&prod) && s.matches(&bare));

        // "partition in (customerA, customerB),environment!=qa"
        let s = Selector::parse("partition in (customerA, customerB),environment!=qa").unwrap();
        assert!(!s.matches(&qa));
        let qa_prod = labels(&[("environment", "production"), ("partition", "customerB")]);
        assert!(s.matches(&qa_prod));
    }

    #[test]
    fn upstream_documented_equality_cases() {
        let s = Selector::parse("environment = production,tier != frontend").unwrap();
        assert!(s.matches(&labels(&[("environment", "production")])));
        assert!(s.matches(&labels(&[("environment", "production"), ("tier", "cache")])));
        assert!(!s.matches(&labels(&[("environment", "production"), ("tier", "frontend")])));
        assert!(!s.matches(&labels(&[("tier", "cache")])));
        assert_eq!(
            Selector::parse("environment==production").unwrap(),
            Selector::parse("environment=production").unwrap()
        );
    }

    // The Deployment/DaemonSet example: matchLabels and matchExpressions ANDed.
    #[test]
    fn match_labels_and_expressions_are_anded() {
        let ls = LabelSelector {
            match_labels: [("component".to_owned(), "redis".to_owned())].into(),
            match_expressions: vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOperator::In,
                    values: vec!["cache".into()],
                },
                LabelSelectorRequirement {
                    key: "environment".into(),
                    operator: SelectorOperator::NotIn,
                    values: vec!["dev".into()],
                },
            ],
        };
        let s = Selector::try_from(&ls).unwrap();
        assert!(s.matches(&labels(&[("component", "redis"), ("tier", "cache")])));
        assert!(s.matches(&labels(&[("component", "redis"), ("tier", "cache"), ("environment", "prod")])));
        assert!(!s.matches(&labels(&[("component", "redis"), ("tier", "cache"), ("environment", "dev")])));
        assert!(!s.matches(&labels(&[("component", "redis")])));
        assert!(!s.matches(&labels(&[("tier", "cache")])));
    }

    #[test]
    fn empty_selector_selects_everything() {
        let s = Selector::try_from(&LabelSelector::default()).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(Selector::parse("  ").unwrap().is_everything());
        // As upstream: `()` is the set holding the empty value.
        let s = Selector::parse("a in ()").unwrap();
        assert!(s.matches(&labels(&[("a", "")])) && !s.matches(&labels(&[])));
    }

    #[test]
    fn invalid_requirements_are_rejected_like_upstream() {
        let in_empty = LabelSelector {
            match_expressions: vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: SelectorOperator::In,
                values: vec![],
            }],
            ..Default::default()
        };
        assert!(Selector::try_from(&in_empty).is_err());
        let exists_vals = LabelSelector {
            match_expressions: vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: SelectorOperator::Exists,
                values: vec!["x".into()],
            }],
            ..Default::default()
        };
        assert!(Selector::try_from(&exists_vals).is_err());
        for bad in ["a in (b", "=b", "a=b,", "a >1", "a in b", "-a=b", "a=b c"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_round_trips() {
        let s = Selector::parse("b notin (y,x), a=1, c, !d, e in (p,q)").unwrap();
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
    }
}
