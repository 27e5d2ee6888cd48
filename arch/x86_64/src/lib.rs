#![no_std]
//! klp back-end for x86_64 (work in progress).
