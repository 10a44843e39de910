"""Security decisions and adapters: authorization, peer authentication, identity."""
