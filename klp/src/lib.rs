#![no_std]
extern crate alloc;

pub mod arch;
pub mod shadow;
