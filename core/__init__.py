"""Pure-logic core of the ResNet-18 transfer-learning tool. No UI imports here:
the CLI (train.py, predict.py) and the Gradio app (demo_app/) both call into it."""
