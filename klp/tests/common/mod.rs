#![allow(dead_code)]

pub mod elfbuild;
pub mod image;
pub mod symhost;
pub mod taskhost;
