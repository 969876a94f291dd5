//! The Dockerfile language as BuildKit v0.11.6 reads it (dockerfile 1.5 syntax, with the
//! labs-channel extras the reference build had): the [`parser`] (directives, line
//! continuations, comments, heredocs, JSON and shell forms), the typed [`instructions`]
//! with their flags, validation and BuildKit's error texts, the [`shell`] word lexer that
//! expands `$VAR`/`${VAR:-x}` as BuildKit does, and [`gocompat`], the Go text semantics
//! (quoting, durations, numbers, CSV, suggestions) BuildKit's messages depend on.
//!
//! It knows nothing of LLB: `kiln-dockerfile` turns what this parses into a Definition.

pub mod gocompat;
pub mod instructions;
pub mod parser;
pub mod shell;
