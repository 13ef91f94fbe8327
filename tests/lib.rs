//! Shared helpers live in the test files; this crate exists to host `tests/`.
