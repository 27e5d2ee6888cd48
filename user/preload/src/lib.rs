//! libklp.so (being written).
