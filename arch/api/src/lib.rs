#![no_std]
//! The architecture interface of klp (work in progress).
