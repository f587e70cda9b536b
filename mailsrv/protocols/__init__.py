"""One module per protocol, each a LineHandler subclass (see mailsrv.server)."""
