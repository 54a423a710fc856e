"""What a request is made of: images, video, text files, prompts, chat turns and modality tags."""
