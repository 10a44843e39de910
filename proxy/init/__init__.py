"""synchro-init: iptables redirection for an injected Pod."""
