//! The gateway's resolver: a sans-IO DNS core (parse, policy, cache, name memory) with async
//! upstream and server shells around it.
