"""Exchange adapters: the REST/WebSocket clients, live feeds and brokers for real venues (WEEX first)."""
