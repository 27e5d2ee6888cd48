pub mod elfbuild;
