"""The sweep spec: typed, validated sections; the only code that knows the YAML's shape."""
