"""What the sites train on: Fashion-MNIST and its partitions (fashion_mnist), the byte-level text
of the char-LM tasks (text), a user's own image dataset (own_images), and the tasks that pair a
model with its data (tasks). Nothing is imported here: checking a run config reads
fedmoe.data.text and must not load torch, which fashion_mnist and tasks import."""
