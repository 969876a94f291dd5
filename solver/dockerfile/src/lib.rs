//! kiln's Dockerfile frontend: a re-implementation of BuildKit v0.11.6's
//! `frontend/dockerfile` (dockerfile 1.5 syntax, with the labs-channel extras the reference
//! build had) that turns a Dockerfile into an LLB Definition whose ops are byte-identical to
//! BuildKit's, plus the image config BuildKit computes.
//!
//! [`dockerfile_to_llb`] parses (`kiln-dockerfile-syntax`: parser, instructions), expands
//! variables (its shell lexer), resolves base images through an [`ImageMetaResolver`] (all lookups of a
//! build run concurrently), builds the graph ([`convert`] on `kiln-llb`) and the image config
//! ([`image`]). [`opts::from_frontend_opts`] reads `buildctl --opt` style options.
//!
//! What a caller provides, as BuildKit's builder does:
//! * the Dockerfile bytes and, if present, the `.dockerignore` content
//!   ([`ConvertOptions::dockerignore`]);
//! * a resolver for image configs (manifest digest + config blob per reference and
//!   platform);
//! * the session id of the client holding the build context, if any.
//!
//! The build context is the source `local://<context_name>` (default `context`) with
//! `local.sharedkeyhint` = the name, `local.excludepatterns` = the `.dockerignore`
//! patterns, `local.followpaths` = the context paths the Dockerfile reads (absent when it
//! reads `.` or mounts the whole context), and either `local.session` or a random
//! `local.unique`. An empty Definition (no ops) means the target is `scratch` with no
//! filesystem change.

pub mod convert;
pub mod dockerignore;
pub mod image;
pub mod opts;

pub use convert::{
    ConvertError, ConvertOptions, Converted, ImageMetaResolver, ResolveImageConfigOptions,
    ResolvedImageConfig, SourceMapOptions, dockerfile_to_llb,
};
pub use image::Image;
pub use kiln_dockerfile_syntax::parser::Warning;
pub use kiln_llb::ResolveMode;
