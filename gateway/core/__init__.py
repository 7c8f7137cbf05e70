"""What the gateway decides, without I/O: connection state and its transitions, deadlines
with an injected clock, admission of requests, and the ports (Protocols) the async layer
implements. Nothing here awaits, sleeps or touches a socket."""
