from main import *  # noqa
from main import _same, _flag
