"""The choices of --pool and --crops, by the family of models they apply to. Checked by the command line
(featurize.config) and by the modules that build the models (featurize.pooling, featurize.timm_models,
featurize.backbones); a module of constants with no imports, so that those can share it without a cycle and the
command line stays light."""

CNN_POOLS = ("default", "avg", "max", "gem")
VIT_POOLS = ("default", "avg", "max", "token", "map")
POOLS = ("default", "avg", "max", "gem", "token", "map")
CROPS = (1, 5, 10)
