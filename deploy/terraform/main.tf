# A test cluster of filch nodes on AWS: one VPC with one public subnet, N Debian 12
# instances, and a security group that opens only what filch uses between members (etcd
# peers 2380, the gRPC API 7070, metrics 9470, the HTTP face 8080: each one something the
# Ansible roles make listen on the member's address) plus SSH from the
# operator. The instances are bare Debian: deploy/site.yml (Ansible) makes them nodes,
# with the inventory this module renders (output ansible_inventory).

locals {
  tags = merge({ Project = "filch", Cluster = var.name }, var.tags)

  # Ports the members use among themselves; etcd's client port (2379) stays on loopback.
  member_ports = {
    etcd_peer = 2380
    api       = 7070
    metrics   = 9470
    http      = 8080
  }

  availability_zone = var.availability_zone != "" ? var.availability_zone : data.aws_availability_zones.available.names[0]
}

data "aws_availability_zones" "available" {
  state = "available"
}

data "aws_ami" "debian" {
  most_recent = true
  owners      = [var.ami_owner]

  filter {
    name   = "name"
    values = [var.ami_name_pattern]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = var.name })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = var.name })
}

resource "aws_subnet" "this" {
  vpc_id                  = aws_vpc.this.id
  cidr_block              = var.subnet_cidr
  availability_zone       = local.availability_zone
  map_public_ip_on_launch = true
  tags                    = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_route_table" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_route" "internet" {
  route_table_id         = aws_route_table.this.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this.id
}

resource "aws_route_table_association" "this" {
  subnet_id      = aws_subnet.this.id
  route_table_id = aws_route_table.this.id
}

resource "aws_security_group" "node" {
  name        = "${var.name}-node"
  description = "filch nodes: etcd peers, API, metrics and HTTP between members; SSH from the operator"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-node" })
}

# Member to member: each port only from the security group itself.
resource "aws_vpc_security_group_ingress_rule" "member" {
  for_each = local.member_ports

  security_group_id            = aws_security_group.node.id
  description                  = "filch ${each.key} between members"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.node.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.ssh_cidr_blocks)

  security_group_id = aws_security_group.node.id
  description       = "SSH (Ansible) from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
  tags              = local.tags
}

# Out: the Debian mirror and PyPI (packages, the agent's dependencies), NTP, DNS.
resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.node.id
  description       = "Everything out (package mirrors)"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_key_pair" "this" {
  key_name   = var.name
  public_key = var.ssh_public_key
  tags       = local.tags
}

resource "aws_instance" "node" {
  count = var.node_count

  ami                    = data.aws_ami.debian.id
  instance_type          = var.instance_type
  subnet_id              = aws_subnet.this.id
  vpc_security_group_ids = [aws_security_group.node.id]
  key_name               = aws_key_pair.this.key_name

  root_block_device {
    volume_size = var.root_volume_size
    volume_type = "gp3"
    encrypted   = true
  }

  metadata_options {
    http_tokens = "required"
  }

  tags = merge(local.tags, { Name = "${var.name}-${count.index + 1}" })
}
