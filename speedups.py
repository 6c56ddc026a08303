"""Speed tricks, behind trainer.speedups (placeholder while they move here from model.py)."""
from model import cls_only_last_layer, use_cpu_dropout


def apply(model, device):
    cls_only_last_layer(model)
    if device.type == "cpu":
        use_cpu_dropout(model)
    return model
