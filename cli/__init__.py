"""Command-line front ends: parse flags into core configs and print results.
This is the only layer (with demo_app/) that prints."""
