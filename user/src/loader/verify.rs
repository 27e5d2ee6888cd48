//! Which patch files get in: build ids and signatures. (Being written.)
