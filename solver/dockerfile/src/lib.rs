//! kiln's Dockerfile frontend: a re-implementation of BuildKit v0.11.6's
//! `frontend/dockerfile` that turns a Dockerfile into an LLB Definition whose ops are
//! byte-identical to BuildKit's, plus the image config BuildKit computes.

pub mod dockerignore;
pub mod gocompat;
pub mod image;
pub mod instructions;
pub mod llb;
pub mod parser;
pub mod reference;
pub mod shell;
