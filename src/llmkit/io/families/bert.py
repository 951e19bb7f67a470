MODEL_TYPES=('bert',)
