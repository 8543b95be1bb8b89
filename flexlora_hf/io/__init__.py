"""Reading and writing adapter folders, split by concern.

`atomic` (crash-safe file writes), `native` (the native view: compact tensors, reading and validation, restoring
into a model), `peft_view` (the plain PEFT LoRA view and the model introspection it needs), `history` (the rank
history JSON and heatmap, one writer for the Trainer and the saver) and `save` (one folder with everything).
Nothing here constructs a `FlexLoRAModel`: that is `model.py`'s job, so imports point one way (model -> io).
"""
