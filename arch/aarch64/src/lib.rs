#![no_std]
//! klp back-end for aarch64 (work in progress).
