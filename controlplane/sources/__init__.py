"""Where the control plane reads resources from: a directory of YAML, or Kubernetes."""
