use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn sample() -> RunSpec {
    let mut spec = RunSpec::process(["sh", "-c", "echo hello; sleep 60"]);
    spec.env.insert("GREETING".into(), "hello world".into());
    spec.env.insert("A_FIRST".into(), String::new());
    spec.working_dir = Some("/tmp".into());
    spec.restart = RestartPolicy::OnFailure;
    spec.max_restarts = 3;
    spec.stop_grace_ms = 2_500;
    spec.config = Some("key: value\n".into());
    spec
}

#[test]
fn a_spec_round_trips() {
    let spec = sample();
    let bytes = spec.encode().unwrap();
    assert_eq!(RunSpec::decode(&bytes, &limits()).unwrap(), spec);
    let container = RunSpec::container("registry.example/cdn-cache:1.4");
    assert_eq!(RunSpec::decode(&container.encode().unwrap(), &limits()).unwrap(), container);
}

#[test]
fn the_encoding_is_the_documented_one() {
    // The bytes of docs/protocol.md's example: a change here is a format change (new version).
    let spec = RunSpec::process(["true"]);
    assert_eq!(
        spec.encode().unwrap(),
        [
            b'K', b'R', b'S', 1, // header, version
            0, // image: none
            1, 4, b't', b'r', b'u', b'e', // command: ["true"]
            0,    // args
            0,    // env
            0,    // working_dir: none
            0,    // restart: always
            5,    // max_restarts
            0x90, 0x4e, // stop_grace_ms 10000 (varint)
            0,    // config: none
        ]
    );
}

#[test]
fn a_number_in_a_longer_form_than_it_needs_is_refused() {
    // postcard reads 0x90 0xce 0x00 as 10000 too; a spec has one encoding.
    let bytes = RunSpec::process(["true"]).encode().unwrap();
    let at = bytes.windows(2).position(|w| w == [0x90, 0x4e]).unwrap();
    let padded = [&bytes[..at], &[0x90, 0xce, 0x00], &bytes[at + 2..]].concat();
    let err = RunSpec::decode(&padded, &limits()).unwrap_err();
    assert!(matches!(err, RunSpecError::Malformed(r) if r.contains("shortest form")), "{err}");
}

#[test]
fn the_old_json_spec_is_refused_with_a_reason() {
    let json = br#"{"image":"registry.example/cdn-cache:1.4"}"#;
    let err = RunSpec::decode(json, &limits()).unwrap_err();
    assert_eq!(err, RunSpecError::NotARunSpec);
    assert!(err.to_string().contains("not a kole runtime spec"), "{err}");
}

#[test]
fn versions_other_than_one_are_refused() {
    let mut bytes = sample().encode().unwrap();
    bytes[3] = 2;
    let err = RunSpec::decode(&bytes, &limits()).unwrap_err();
    assert_eq!(err, RunSpecError::NewerVersion { found: 2, supported: 1 });
    assert!(err.to_string().contains("upgrade kole-agent"), "{err}");
    bytes[3] = 0;
    assert_eq!(RunSpec::decode(&bytes, &limits()).unwrap_err(), RunSpecError::UnknownVersion(0));
    assert!(matches!(RunSpec::decode(b"KRS", &limits()), Err(RunSpecError::Malformed(_))));
}

#[test]
fn every_truncation_and_trailing_byte_is_refused() {
    let bytes = sample().encode().unwrap();
    for end in 0..bytes.len() {
        assert!(RunSpec::decode(&bytes[..end], &limits()).is_err(), "prefix of {end} bytes decoded");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        RunSpec::decode(&longer, &limits()).unwrap_err(),
        RunSpecError::Malformed("trailing bytes after the spec")
    );
}

#[test]
fn the_size_limit_is_checked_first() {
    let bytes = sample().encode().unwrap();
    let small = DecodeLimits { max_spec_bytes: bytes.len() - 1, ..limits() };
    assert_eq!(
        RunSpec::decode(&bytes, &small).unwrap_err(),
        RunSpecError::TooLarge { len: bytes.len(), max: bytes.len() - 1 }
    );
    let mut huge = RunSpec::process(["x"]);
    huge.config = Some("y".repeat(MAX_CONFIG_LEN));
    assert!(matches!(huge.encode(), Err(RunSpecError::TooLarge { .. })));
}

#[test]
fn env_names_must_be_sorted_unique_and_not_reserved() {
    // Hand-built body with env out of order: a second encoding of the same spec.
    let body = Body {
        image: None,
        command: vec!["true"],
        args: vec![],
        env: vec![("B", "1"), ("A", "2")],
        working_dir: None,
        restart: RestartPolicy::Always,
        max_restarts: 5,
        stop_grace_ms: 0,
        config: None,
    };
    let mut bytes = b"KRS\x01".to_vec();
    bytes = postcard::to_extend(&body, bytes).unwrap();
    let err = RunSpec::decode(&bytes, &limits()).unwrap_err();
    assert!(matches!(err, RunSpecError::Invalid { field: "env", .. }), "{err}");

    let mut spec = RunSpec::process(["true"]);
    spec.env.insert("KOLE_NODE".into(), "spoofed".into());
    let err = spec.encode().unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    for bad in ["", "1ABC", "A=B", "A B", "Ä"] {
        let mut spec = RunSpec::process(["true"]);
        spec.env.insert(bad.into(), "v".into());
        assert!(spec.encode().is_err(), "env name {bad:?} accepted");
    }
}

#[test]
fn invalid_specs_are_refused_with_the_field_named() {
    let cases: Vec<(RunSpec, &str)> = vec![
        (RunSpec::default(), "command"),
        (RunSpec::process([""]), "command"),
        (RunSpec::process(["a\0b"]), "command"),
        (RunSpec::container(""), "image"),
        (RunSpec::container("has space:1"), "image"),
        (RunSpec { working_dir: Some("relative".into()), ..RunSpec::process(["true"]) }, "workingDir"),
        (RunSpec { max_restarts: MAX_RESTARTS_LIMIT + 1, ..RunSpec::process(["true"]) }, "maxRestarts"),
        (RunSpec { stop_grace_ms: MAX_STOP_GRACE_MS + 1, ..RunSpec::process(["true"]) }, "stopGrace"),
        (RunSpec::process(vec!["x"; MAX_ARGV + 1]), "args"),
    ];
    for (spec, field) in cases {
        match spec.validate() {
            Err(RunSpecError::Invalid { field: f, .. }) => assert_eq!(f, field, "{spec:?}"),
            other => panic!("{spec:?}: expected an invalid {field}, got {other:?}"),
        }
    }
}

fn word() -> impl Strategy<Value = String> {
    "[^\0]{0,12}"
}

fn spec_strategy() -> impl Strategy<Value = RunSpec> {
    (
        proptest::option::of("[a-z0-9./:-]{1,40}"),
        proptest::collection::vec(word(), 0..4),
        proptest::collection::vec(word(), 0..4),
        proptest::collection::btree_map("[A-Za-z_][A-Za-z0-9_.-]{0,10}", word(), 0..4),
        proptest::option::of("/[a-z/]{0,20}"),
        prop_oneof![Just(RestartPolicy::Always), Just(RestartPolicy::OnFailure), Just(RestartPolicy::Never)],
        0..=MAX_RESTARTS_LIMIT,
        0..=MAX_STOP_GRACE_MS,
        proptest::option::of(".{0,40}"),
    )
        .prop_map(|(image, mut command, args, env, working_dir, restart, max_restarts, stop_grace_ms, config)| {
            if image.is_none() || command.first().is_some_and(String::is_empty) {
                command.insert(0, "prog".into());
            }
            let env: BTreeMap<String, String> =
                env.into_iter().filter(|(k, _)| !k.starts_with(RESERVED_ENV_PREFIX)).collect();
            RunSpec { image, command, args, env, working_dir, restart, max_restarts, stop_grace_ms, config }
        })
}

proptest! {
    #[test]
    fn valid_specs_round_trip_canonically(spec in spec_strategy()) {
        let bytes = spec.encode().unwrap();
        let back = RunSpec::decode(&bytes, &limits()).unwrap();
        prop_assert_eq!(&back, &spec);
        prop_assert_eq!(back.encode().unwrap(), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decode_only_canonically(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = b"KRS\x01".to_vec();
        bytes.extend_from_slice(&tail);
        if let Ok(spec) = RunSpec::decode(&bytes, &limits()) {
            prop_assert_eq!(spec.encode().unwrap(), bytes);
        }
        let _ = RunSpec::decode(&tail, &limits());
    }

    #[test]
    fn mutated_specs_never_panic(spec in spec_strategy(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = spec.encode().unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(decoded) = RunSpec::decode(&bytes, &limits()) {
            prop_assert_eq!(decoded.encode().unwrap(), bytes);
        }
    }
}
