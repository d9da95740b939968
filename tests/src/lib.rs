//! Cross-crate tests of kole live in `tests/`.
