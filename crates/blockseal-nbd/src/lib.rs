//! blockseal-nbd
