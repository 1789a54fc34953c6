"""The Gradio web app: layout and wiring (ui.py) around core/. See app.py."""
