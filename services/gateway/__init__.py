"""The public edge: Envoy's configuration rendered from the one template (envoy.yaml.j2, package data),
the public endpoint's flags, development TLS and JWT credentials, and the Envoy binary. Envoy itself is
the process; nothing here runs in the request path."""
