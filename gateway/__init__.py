"""Edge gateway: sockets, REST trigger API and the local connection indexes."""
