#![no_std]
//! klp back-end for s390x (work in progress).
