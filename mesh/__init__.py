"""The agent: config, hardware, discovery, gossip, routing, proxying, HTTP server, CLI."""
