"""torch.hub entry points: ``torch.hub.load(<repo dir or github>, '<dynzoo model name>', pretrained=False)``.

Every model registered by dynzoo is exposed under its own name; each entry point calls ``dynzoo.create_model``.
"""
import dynzoo

dependencies = ['torch', 'torchvision', 'timm', 'huggingface_hub', 'safetensors', 'fvcore']


def _entry_point(model_name: str):
    def create(pretrained: bool = False, **kwargs):
        return dynzoo.create_model(model_name, pretrained=pretrained, **kwargs)

    create.__name__ = model_name
    create.__doc__ = f'dynzoo {model_name!r}: see dynzoo.create_model for the keyword arguments.'
    return create


globals().update({name: _entry_point(name) for name in dynzoo.list_models()})
