"""The measure side: clean accuracy and attack success rate of ONNX models in ONNX Runtime.

score (CDA / ASR of one model), triggers (the backdoor triggers ASR stamps), baseline (ORT's own
quantize_static, the model a QCB wakes in), report (tables, plots, JSON).
"""
