"""What crosses the wire and what the server does with it: the message schema and its checks
(wire), which experts a site trains (selection), expert-matched averaging and its robust variants
(aggregation), server optimizers, compressed updates and the sparse, optionally compressed
downlink, personal parts that never leave a site, and the binding of sites to nodes."""
