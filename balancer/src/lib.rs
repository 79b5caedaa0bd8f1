//! MOSIX resource sharing as a sans-IO core: information dissemination, load balancing and
//! memory ushering as plain functions of (state, input, now, rng), plus the simulator.
