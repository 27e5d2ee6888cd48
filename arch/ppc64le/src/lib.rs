#![no_std]
//! klp back-end for ppc64le (work in progress).
