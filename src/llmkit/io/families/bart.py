MODEL_TYPES=('bart',)
