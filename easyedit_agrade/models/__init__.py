"""Editing methods, one folder each, laid out like EasyEdit's ``easyeditor/models/<method>/``."""
