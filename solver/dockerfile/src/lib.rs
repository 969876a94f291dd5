//! kiln's Dockerfile frontend: a re-implementation of BuildKit v0.11.6's
//! `frontend/dockerfile` that turns a Dockerfile into an LLB Definition whose ops are
//! byte-identical to BuildKit's, plus the image config BuildKit computes.
//!
//! The entry point is [`dockerfile_to_llb`]: it parses ([`parser`], [`instructions`]),
//! expands variables ([`shell`]), resolves base images through an [`ImageMetaResolver`]
//! and builds the graph ([`convert`], [`llb`]) and the image config ([`image`]).

pub mod convert;
pub mod dockerignore;
pub mod gocompat;
pub mod image;
pub mod instructions;
pub mod llb;
pub mod opts;
pub mod parser;
pub mod reference;
pub mod shell;

pub use convert::{
    ConvertError, ConvertOptions, Converted, ImageMetaResolver, ResolveImageConfigOptions,
    ResolvedImageConfig, SourceMapOptions, dockerfile_to_llb,
};
pub use image::Image;
pub use llb::ResolveMode;
pub use parser::Warning;
